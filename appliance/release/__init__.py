"""Release artifacts: the manifest (`manifest`), building a .tar.gz with its .sha256 from a
built app directory (`pack`), and checking and unpacking one into an immutable release
directory (`unpack`). Everything a refused artifact does is a UsageError (exit 2)."""
