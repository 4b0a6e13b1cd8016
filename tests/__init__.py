"""The test suite: a package, so that its modules import each other the same way in every pytest import mode."""
