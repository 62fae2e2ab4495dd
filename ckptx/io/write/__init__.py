"""Writers: every output format behind one `Writer` interface, written atomically (temporary file or staging
folder beside the destination, fsync, rename), with the destination rule."""
