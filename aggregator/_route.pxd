# The compiled route stage's entry for other compiled modules (_loops.pyx).
cdef object apply_event_c(object self, object batch, object ev, object rec)
cdef object apply_local_c(object self, object batch, object f, object key, object slot,
                          object ev)
