"""The trust rule: nothing runs that the user did not ask for (which named callables may be called, which pickle
globals may be allowed, and what may be imported to look at a name a file gives)."""
