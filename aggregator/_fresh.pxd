# A stored document's freshness map kept as its msgpack bytes (_fresh.pyx), for the compiled
# route stage (_route.pyx: reads records, sets a source's entry) and worker loops (_loops.pyx:
# writes records).
cdef class Fresh:
    cdef object raw         # bytes holding the map as stored (None once `d` is made)
    cdef Py_ssize_t off     # the map's first byte in `raw`
    cdef Py_ssize_t end     # the index after it
    cdef dict pending       # source -> entry set since (None: none)
    cdef dict d             # the map as a dict, once something asked for one (else None)
    cdef int put(self, object source, object entry) except -1
    cdef object swap(self, object source, object entry)
    cdef int unswap(self, object source, object old) except -1
    cdef Fresh clone(self)
    cdef dict as_dict_c(self)
    cdef bytes packed(self)
    cdef bytes _merged(self)


cdef object read_record(object raw)
