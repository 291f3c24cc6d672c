# Reading a ``__slots__`` attribute of a plain Python class by its offset (no attribute
# lookup): `slot_offset` finds the offset once, at a module's import, from the class's
# member descriptor (the same offset ``obj.name`` reads through); `slot_get` reads it, and
# `slot_attr` does when ``type(obj) is cls`` (an exact type: a subclass could override the
# attribute), otherwise getattr. Used for envelope.Event and plan.Feed on the per-event paths
# of _route.pyx, _merge.pyx and _core.pyx; _envelope.pyx writes a new Event's slots at the
# offsets (``writable=True``).

from cpython.object cimport PyObject


cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        const char* name
        int type
        Py_ssize_t offset
        int flags
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member

cdef extern from "structmember.h":  # the 3.11 names (3.12 adds Py_T_OBJECT_EX, ...)
    int T_OBJECT_EX
    int READONLY


cdef inline Py_ssize_t slot_offset(type cls, str name, bint writable=False) except -1:
    """The offset of slot `name` of `cls` (ImportError if it is not a plain object slot of
    a class without __dict__ or its own attribute machinery; `writable`: nor a read-only
    one)."""
    if ("__dict__" in dir(cls) or cls.__getattribute__ is not object.__getattribute__
            or hasattr(cls, "__getattr__")):
        raise ImportError(f"{cls.__qualname__} is not a plain __slots__ class")
    d = cls.__dict__.get(name)
    if type(d).__name__ != "member_descriptor":
        raise ImportError(f"{cls.__qualname__}.{name} is not a slot")
    cdef PyMemberDef* m = (<PyMemberDescrObject*>d).d_member
    if m.type != T_OBJECT_EX or (writable and m.flags & READONLY):
        raise ImportError(f"{cls.__qualname__}.{name} is not a{' writable' if writable else 'n'}"
                          " object slot")
    return m.offset


cdef inline int plain_layout(type cls, tuple slots, str module, Py_ssize_t* out) except -1:
    """Fill ``out[i]`` with the writable offset of ``slots[i]`` of `cls`, after checking that
    `cls` has exactly these slots and nothing that could intercept an attribute write or the
    allocation (no __dict__, no __setattr__, object.__new__, no base but object): what a
    module that makes `cls` instances and fills them at the offsets relies on. ImportError
    naming `module` otherwise."""
    if (tuple(sorted(cls.__slots__)) != tuple(sorted(slots)) or "__dict__" in dir(cls)
            or cls.__setattr__ is not object.__setattr__
            or cls.__new__ is not object.__new__ or len(cls.__mro__) != 2):
        raise ImportError(f"aggregator.{module}: {cls.__module__}.{cls.__qualname__} is no "
                          f"longer a plain __slots__ class; rebuild this module's "
                          f"construction of it")
    for i, name in enumerate(slots):
        out[i] = slot_offset(cls, name, True)  # ImportError if not a writable slot
    return 0


cdef inline object slot_get(object o, Py_ssize_t offset, str name):
    """``o.<name>`` read at `offset` (an empty slot: getattr, i.e. its AttributeError)."""
    cdef PyObject* p = (<PyObject**>(<char*><PyObject*>o + offset))[0]
    if p is NULL:
        return getattr(o, name)
    return <object>p


cdef inline object slot_attr(object o, type cls, Py_ssize_t offset, str name):
    """``o.<name>``: read at `offset` when `o` is exactly a `cls` (a subclass could override
    the attribute), else through getattr."""
    if type(o) is cls:
        return slot_get(o, offset, name)
    return getattr(o, name)
