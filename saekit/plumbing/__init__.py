"""What keeps every command honest, below the library: files written whole, one writer per folder,
inputs checked before the work, and the version.

    files.py    atomic writes, output folders checked before the work, OS errors as messages
    locks.py    one writer per folder (fcntl.flock), naming the holder to a second writer
    checks.py   an SAE and its data checked against each other; finite activations; whole numbers
    version.py  the version, from the installed package's metadata
"""
