"""Reading and writing of STAR files, particle stacks and MRC volumes."""
