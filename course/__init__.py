"""The course kit: assignments made from this repository's functions, graded by its tests one function at a time.

assignments.py is the table (which function, which equation, how many points, which tests grade it); tool.py makes a
student copy and grades a copy; mutants.py holds wrong implementations the grading tests must catch (instructor only).
`python course.py list | make DIR | grade [DIR]` is the command line."""
