"""course_lib: the reference implementations the course's chapters import and its exercises are checked against.

Import ``course_lib.backend`` first (every submodule does): it fixes GPU or CPU mode for the process.
"""

__version__ = "0.1.0"
