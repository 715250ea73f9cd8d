"""(face written in the next step)"""
