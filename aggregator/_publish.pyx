# cython: language_level=3
"""Change events produced from compiled code: one C loop per outbox blob, delivery reports
tallied in C (changes.NativeChangePublisher is the Python side).

librdkafka is the one that ships with confluent-kafka (its wheel bundles it; a build against
a system librdkafka loads that one): `load()` finds the file the already imported
``confluent_kafka.cimpl`` mapped (/proc/self/maps), dlopens it and takes the few functions
used here with dlsym, declared below after librdkafka's rdkafka.h. Nothing links against it
at build time, so the wheel's hashed file name never matters.

A blob (changes.py, `pack_blob`) holds a commit's change events with consecutive sequence
numbers; the outbox may store it compressed, and the publisher hands it here as `pack_blob`
wrote it (changes.open_blob). `BlobProducer.produce` hands those after `sent` to librdkafka with
`rd_kafka_produceva` (the key copied by librdkafka; the value copied too unless the blob is a
`bytes` object, which is immutable: then librdkafka reads the value where it lies in the blob,
and the producer holds the blob until every event produced from it was delivered, or until
the producer is destroyed; the CloudEvents headers as one list built to size,
`agg_ce_headers`, which the produce takes over), each
with its seq as the message opaque, and stops at a full queue. The delivery-report callback
(run by `rd_kafka_poll`/`rd_kafka_flush` in the calling thread, no Python) marks the seq in
a ring of flags; `poll()` advances the watermark `delivered` over the marked prefix, so the
caller learns "every change <= delivered was delivered" also while others are in flight.
A failed delivery leaves its seq unmarked (the watermark stops there) and counts in
`failed`; once nothing is outstanding the caller replaces the producer with a new one that
sends again from `delivered + 1`, as the reference publisher does.
"""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcmp, memcpy, memset
from libc.stdlib cimport calloc, free, malloc, realloc
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_AsUTF8AndSize

import struct as _struct
from collections import deque as _deque

cdef extern from *:
    """
    #include <dlfcn.h>
    #include <stdint.h>
    #include <stdio.h>
    #include <string.h>
    #include <sys/types.h>
    #include <time.h>

    /* From librdkafka's rdkafka.h (same layout, opaque handles as void). */
    typedef struct {
        int vtype;                                   /* rd_kafka_vtype_t */
        union {
            const char *cstr; void *rkt; int i; int32_t i32; int64_t i64;
            struct { void *ptr; size_t size; } mem;
            struct { const char *name; const void *val; ssize_t size; } header;
            void *headers; void *ptr; char _pad[64];
        } u;
    } agg_vu;                                        /* rd_kafka_vu_t */
    typedef struct {
        int err; void *rkt; int32_t partition; void *payload; size_t len;
        void *key; size_t key_len; int64_t offset; void *_private;
    } agg_msg;                                       /* rd_kafka_message_t */

    enum { AGG_V_RKT = 2, AGG_V_VALUE = 4, AGG_V_KEY = 5, AGG_V_OPAQUE = 6,
           AGG_V_MSGFLAGS = 7, AGG_V_HEADER = 9, AGG_V_HEADERS = 10 };
    #define AGG_MSG_F_COPY 0x2
    #define AGG_ERR_QUEUE_FULL (-184)
    #define AGG_PURGE_QUEUE 0x1
    #define AGG_PURGE_INFLIGHT 0x2


    static void *(*agg_conf_new)(void);
    static int (*agg_conf_set)(void *conf, const char *name, const char *value,
                               char *errstr, size_t errstr_size);
    static void (*agg_conf_destroy)(void *conf);
    static void (*agg_conf_set_opaque)(void *conf, void *opaque);
    static void (*agg_conf_set_dr_msg_cb)(void *conf, void *cb);
    static void (*agg_conf_set_error_cb)(void *conf, void *cb);
    static void (*agg_conf_set_log_cb)(void *conf, void *cb);
    static void *(*agg_new)(int type, void *conf, char *errstr, size_t errstr_size);
    static void (*agg_destroy)(void *rk);
    static void *(*agg_topic_new)(void *rk, const char *topic, void *conf);
    static void (*agg_topic_destroy)(void *rkt);
    static void *(*agg_produceva)(void *rk, const agg_vu *vus, size_t cnt);
    static int (*agg_error_code)(const void *error);
    static const char *(*agg_error_string)(const void *error);
    static void (*agg_error_destroy)(void *error);
    static int (*agg_poll)(void *rk, int timeout_ms);
    static int (*agg_flush)(void *rk, int timeout_ms);
    static int (*agg_outq_len)(void *rk);
    static int (*agg_purge)(void *rk, int flags);
    static const char *(*agg_err2str)(int err);
    static void *(*agg_headers_new)(size_t initial_count);
    static void (*agg_headers_destroy)(void *hdrs);
    static int (*agg_header_add)(void *hdrs, const char *name, ssize_t name_size,
                                 const void *value, ssize_t value_size);
    static int (*agg_fatal_error)(void *rk, char *errstr, size_t errstr_size);

    static const char *agg_load(const char *path) {
        void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!h) return dlerror();
        #define AGG_SYM(var, name) if (!(*(void **)&var = dlsym(h, name))) return name;
        AGG_SYM(agg_conf_new, "rd_kafka_conf_new")
        AGG_SYM(agg_conf_set, "rd_kafka_conf_set")
        AGG_SYM(agg_conf_destroy, "rd_kafka_conf_destroy")
        AGG_SYM(agg_conf_set_opaque, "rd_kafka_conf_set_opaque")
        AGG_SYM(agg_conf_set_dr_msg_cb, "rd_kafka_conf_set_dr_msg_cb")
        AGG_SYM(agg_conf_set_error_cb, "rd_kafka_conf_set_error_cb")
        AGG_SYM(agg_conf_set_log_cb, "rd_kafka_conf_set_log_cb")
        AGG_SYM(agg_new, "rd_kafka_new")
        AGG_SYM(agg_destroy, "rd_kafka_destroy")
        AGG_SYM(agg_topic_new, "rd_kafka_topic_new")
        AGG_SYM(agg_topic_destroy, "rd_kafka_topic_destroy")
        AGG_SYM(agg_produceva, "rd_kafka_produceva")
        AGG_SYM(agg_error_code, "rd_kafka_error_code")
        AGG_SYM(agg_error_string, "rd_kafka_error_string")
        AGG_SYM(agg_error_destroy, "rd_kafka_error_destroy")
        AGG_SYM(agg_poll, "rd_kafka_poll")
        AGG_SYM(agg_flush, "rd_kafka_flush")
        AGG_SYM(agg_outq_len, "rd_kafka_outq_len")
        AGG_SYM(agg_purge, "rd_kafka_purge")
        AGG_SYM(agg_err2str, "rd_kafka_err2str")
        AGG_SYM(agg_fatal_error, "rd_kafka_fatal_error")
        AGG_SYM(agg_headers_new, "rd_kafka_headers_new")
        AGG_SYM(agg_headers_destroy, "rd_kafka_headers_destroy")
        AGG_SYM(agg_header_add, "rd_kafka_header_add")
        #undef AGG_SYM
        return NULL;
    }

    /* The delivery tally, the producer's opaque. */
    typedef struct {
        uint8_t *done;          /* ring of flags: done[seq & mask] = delivered */
        uint64_t mask;
        uint64_t failed;        /* deliveries that failed (a new producer starts at 0) */
        int failed_err;
        uint64_t errors;        /* error_cb calls */
        int last_err;
        char last_reason[256];
    } agg_tally;

    static void agg_on_delivery(void *rk, const agg_msg *m, void *opaque) {
        agg_tally *t = (agg_tally *)opaque;
        if (m->err) {
            t->failed++;
            t->failed_err = m->err;
        } else {
            t->done[(uint64_t)(uintptr_t)m->_private & t->mask] = 1;
        }
    }

    static void agg_on_error(void *rk, int err, const char *reason, void *opaque) {
        agg_tally *t = (agg_tally *)opaque;
        t->errors++;
        t->last_err = err;
        snprintf(t->last_reason, sizeof t->last_reason, "%s", reason ? reason : "");
    }

    static inline void agg_vu_ptr(agg_vu *v, int type, void *p) {
        v->vtype = type; v->u.ptr = p;
    }
    static inline void agg_vu_int(agg_vu *v, int type, int i) {
        v->vtype = type; v->u.i = i;
    }
    static inline void agg_vu_mem(agg_vu *v, int type, const void *p, size_t n) {
        v->vtype = type; v->u.mem.ptr = (void *)p; v->u.mem.size = n;
    }
    /* A change event's CloudEvents headers, in their order, as one list sized for them (8, or
       9 with content-type): produceva's VTYPE_HEADER would start a list of 8 and grow it
       for the 9th, and strlen every name. The caller owns the list until a produce takes it. */
    #define AGG_HDR(name, v, n) agg_header_add(h, name, sizeof(name) - 1, v, (ssize_t)(n))
    static void *agg_ce_headers(const char *cid, size_t cid_len, const char *src,
                                size_t src_len, const void *key, size_t klen,
                                const char *ver, size_t ver_len, const char *when,
                                size_t when_len, const char *ct, size_t ct_len) {
        void *h = agg_headers_new(ct ? 9 : 8);
        AGG_HDR("ce_specversion", "1.0", 3);
        AGG_HDR("ce_id", cid, cid_len);
        AGG_HDR("ce_source", src, src_len);
        if (ct) AGG_HDR("ce_type", "aggregator.view.changed", 23);
        else AGG_HDR("ce_type", "aggregator.view.deleted", 23);
        AGG_HDR("ce_subject", key, klen);
        AGG_HDR("ce_partitionkey", key, klen);
        AGG_HDR("ce_sequence", ver, ver_len);
        AGG_HDR("ce_time", when, when_len);
        if (ct) AGG_HDR("content-type", ct, ct_len);
        return h;
    }
    #undef AGG_HDR
    /* RFC 3339 UTC with milliseconds (changes.ce_time): 24 bytes into out. */
    static int agg_ce_time(int64_t ms, char *out) {
        time_t s = (time_t)(ms / 1000);
        struct tm tm;
        gmtime_r(&s, &tm);
        size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
        return (int)n + snprintf(out + n, 32 - n, ".%03dZ", (int)(ms % 1000));
    }
    """
    ctypedef struct agg_vu:
        int vtype
    ctypedef struct agg_tally:
        uint8_t *done
        uint64_t mask
        uint64_t failed
        int failed_err
        uint64_t errors
        int last_err
        char last_reason[256]
    int AGG_V_RKT, AGG_V_VALUE, AGG_V_KEY, AGG_V_OPAQUE, AGG_V_MSGFLAGS, AGG_V_HEADERS
    int AGG_MSG_F_COPY, AGG_ERR_QUEUE_FULL, AGG_PURGE_QUEUE, AGG_PURGE_INFLIGHT
    const char *agg_load(const char *path)
    void *agg_conf_new()
    int agg_conf_set(void *conf, const char *name, const char *value, char *errstr,
                     size_t errstr_size)
    void agg_conf_destroy(void *conf)
    void agg_conf_set_opaque(void *conf, void *opaque)
    void agg_conf_set_dr_msg_cb(void *conf, void *cb)
    void agg_conf_set_error_cb(void *conf, void *cb)
    void agg_conf_set_log_cb(void *conf, void *cb)
    void *agg_new(int type, void *conf, char *errstr, size_t errstr_size)
    void agg_destroy(void *rk) nogil
    void *agg_topic_new(void *rk, const char *topic, void *conf)
    void agg_topic_destroy(void *rkt)
    void *agg_produceva(void *rk, const agg_vu *vus, size_t cnt)
    int agg_error_code(const void *error)
    const char *agg_error_string(const void *error)
    void agg_error_destroy(void *error)
    int agg_poll(void *rk, int timeout_ms)
    int agg_flush(void *rk, int timeout_ms) nogil
    int agg_outq_len(void *rk)
    int agg_purge(void *rk, int flags)
    const char *agg_err2str(int err)
    int agg_fatal_error(void *rk, char *errstr, size_t errstr_size)
    void agg_on_delivery(void *rk, const void *m, void *opaque)
    void agg_on_error(void *rk, int err, const char *reason, void *opaque)
    void agg_vu_ptr(agg_vu *v, int type, void *p)
    void agg_vu_int(agg_vu *v, int type, int i)
    void agg_vu_mem(agg_vu *v, int type, const void *p, size_t n)
    int agg_ce_time(int64_t ms, char *out)
    void agg_headers_destroy(void *hdrs)
    void *agg_ce_headers(const char *cid, size_t cid_len, const char *src, size_t src_len,
                         const void *key, size_t klen, const char *ver, size_t ver_len,
                         const char *when, size_t when_len, const char *ct, size_t ct_len)

cdef enum:
    BLOB_FORMAT = 1
    BLOB_LZ4 = 2  # flag: the body is an LZ4 block (changes.compress_blob; never handed here)
    BLOB_JSON = 1  # flag: the data is JSON
    BLOB_LOGGED = 4  # flag: data left out, in the doc_log (changes.stored_blob; never here)
    BLOB_HEAD = 16  # <BBHIq: format, flags, 0, count, ms
    BLOB_REC = 18  # <HIiQ: view id, key length, data length (-1: null), version
    RING = 1 << 18  # delivery flags: more than librdkafka's queue may hold in flight
    MAX_VIEWS = 256

cdef bint _loaded = False


@cython.cdivision(True)
cdef inline int _decimal(uint64_t v, char *out) noexcept:
    """``"%llu" % v`` into `out` (at least 20 bytes; no terminating NUL); its length."""
    cdef char tmp[20]
    cdef int n = 0, i
    while True:
        tmp[n] = <char>(48 + v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    for i in range(n):
        out[i] = tmp[n - 1 - i]
    return n


def library_path() -> str:
    """The librdkafka file confluent-kafka's extension loaded (from /proc/self/maps)."""
    import confluent_kafka.cimpl  # noqa: F401  (maps the library)

    with open("/proc/self/maps") as f:
        for line in f:
            path = line.rsplit(None, 1)[-1]
            name = path.rsplit("/", 1)[-1]
            if name.startswith("librdkafka") and ".so" in name:
                return path
    raise ImportError("librdkafka: confluent_kafka.cimpl is loaded but no librdkafka is "
                      "mapped into this process")


def load() -> str:
    """dlopen the librdkafka of confluent-kafka and take its functions; returns its path."""
    global _loaded
    path = library_path()
    if not _loaded:
        err = agg_load(path.encode())
        if err != NULL:
            raise ImportError(f"librdkafka at {path}: {err.decode(errors='replace')}")
        _loaded = True
    return path


cdef inline uint64_t _u(const uint8_t *p, int n) noexcept nogil:
    """Little-endian unsigned integer of n bytes."""
    cdef uint64_t v = 0
    cdef int i
    for i in range(n - 1, -1, -1):
        v = (v << 8) | p[i]
    return v


cdef class BlobProducer:
    """A librdkafka producer of outbox blobs (see the module docstring)."""

    cdef void *rk
    cdef void *rkts[MAX_VIEWS]
    cdef int nviews
    cdef agg_tally tally
    cdef readonly uint64_t sent
    cdef readonly uint64_t delivered
    cdef list sources  # per view: ce_source (bytes)
    cdef list names  # per view: view name (bytes), the ce_id prefix
    cdef list dropped  # (view id, key, version) of events of views without a topic
    cdef char *idbuf
    cdef size_t idcap
    cdef object held  # deque of (last seq produced from it, blob): values not copied

    def __cinit__(self):
        self.rk = NULL
        self.nviews = 0
        memset(&self.tally, 0, sizeof(agg_tally))
        self.idbuf = NULL
        self.idcap = 0

    def __init__(self, dict conf, list topics, list sources, list names, uint64_t sent):
        """`conf`: librdkafka settings (str → str); per view id: its topic (bytes or None),
        ce_source (bytes) and name (bytes); `sent`: every change <= it was delivered."""
        load()
        if len(topics) > MAX_VIEWS:
            raise ValueError(f"at most {MAX_VIEWS} views publish change events")
        cdef char errstr[512]
        cdef void *c = agg_conf_new()
        for k, v in conf.items():
            if agg_conf_set(c, k.encode(), v.encode(), errstr, sizeof(errstr)) != 0:
                agg_conf_destroy(c)
                raise ValueError(f"librdkafka setting {k}={v!r}: {errstr.decode()}")
        self.tally.done = <uint8_t *>calloc(RING, 1)
        if self.tally.done == NULL:
            agg_conf_destroy(c)
            raise MemoryError()
        self.tally.mask = RING - 1
        agg_conf_set_opaque(c, &self.tally)
        agg_conf_set_dr_msg_cb(c, <void *>agg_on_delivery)
        agg_conf_set_error_cb(c, <void *>agg_on_error)
        agg_conf_set_log_cb(c, NULL)
        self.rk = agg_new(0, c, errstr, sizeof(errstr))  # 0: RD_KAFKA_PRODUCER
        if self.rk == NULL:  # the conf is still ours
            agg_conf_destroy(c)
            raise RuntimeError(f"librdkafka producer: {errstr.decode()}")
        self.nviews = len(topics)
        for i, t in enumerate(topics):
            self.rkts[i] = agg_topic_new(self.rk, <bytes>t, NULL) if t is not None else NULL
        self.sources = list(sources)
        self.names = list(names)
        self.dropped = []
        self.held = _deque()
        self.sent = sent
        self.delivered = sent

    cdef char *_id_buffer(self, size_t n) except NULL:
        cdef char *p
        if n > self.idcap:
            p = <char *>realloc(self.idbuf, n)
            if p == NULL:
                raise MemoryError()
            self.idbuf, self.idcap = p, n
        return self.idbuf

    def produce(self, uint64_t first, object blob_obj) -> int:
        """Hand the blob's events with seq > `sent` to librdkafka, in order, until its queue
        (or the delivery ring) is full; returns the new `sent`. A `bytes` blob is not copied:
        the producer holds it until its events are delivered."""
        if self.rk == NULL:
            raise RuntimeError("producer closed")
        cdef const uint8_t[::1] blob = blob_obj
        cdef int vflags = 0 if type(blob_obj) is bytes else AGG_MSG_F_COPY
        cdef uint64_t sent_before = self.sent
        cdef Py_ssize_t size = blob.shape[0]
        if size < BLOB_HEAD or blob[0] != BLOB_FORMAT:
            raise ValueError("not a change outbox blob of format 1")
        if blob[1] & BLOB_LZ4:
            raise ValueError("a compressed change outbox blob: changes.open_blob it first")
        if blob[1] & BLOB_LOGGED:
            raise ValueError("a logged change outbox blob: changes.resolve_stored it first")
        cdef const uint8_t *p = &blob[0]
        cdef bint is_json = p[1] & 1
        cdef uint64_t count = _u(p + 4, 4)
        cdef int64_t ms = <int64_t>_u(p + 8, 8)
        cdef char when[32]
        cdef int when_len = agg_ce_time(ms, when)
        cdef Py_ssize_t pos = BLOB_HEAD
        cdef uint64_t seq = first, k, version
        cdef unsigned int vid, klen
        cdef int32_t dlen
        cdef const uint8_t *key
        cdef const uint8_t *data
        cdef agg_vu vus[16]
        cdef int n
        cdef char ver[24]
        cdef int ver_len
        cdef const char *src
        cdef Py_ssize_t src_len
        cdef const char *name
        cdef Py_ssize_t name_len
        cdef char *cid
        cdef void *err
        cdef void *hdrs
        cdef const char *ct = b"application/msgpack"
        cdef size_t ct_len = 19
        cdef int code
        cdef bytes b
        if is_json:
            ct, ct_len = b"application/json", 16
        try:
            for k in range(count):
                if pos + BLOB_REC > size:
                    raise ValueError("change outbox blob truncated")
                vid = <unsigned int>_u(p + pos, 2)
                klen = <unsigned int>_u(p + pos + 2, 4)
                dlen = <int32_t>_u(p + pos + 6, 4)
                version = _u(p + pos + 10, 8)
                pos += BLOB_REC
                if pos + klen + (dlen if dlen > 0 else 0) > size:
                    raise ValueError("change outbox blob truncated")
                key = p + pos
                pos += klen
                data = NULL
                if dlen >= 0:
                    data = p + pos
                    pos += dlen
                if seq <= self.sent:
                    seq += 1
                    continue
                if seq - self.delivered > self.tally.mask:
                    break  # the delivery ring is full: poll first
                if vid >= <unsigned int>self.nviews or self.rkts[vid] == NULL:
                    self.dropped.append((vid, (<const char *>key)[:klen], version))
                    self.tally.done[seq & self.tally.mask] = 1
                    self.sent = seq
                    seq += 1
                    continue
                b = self.sources[vid]
                src, src_len = <const char *>b, len(b)
                b = self.names[vid]
                name, name_len = <const char *>b, len(b)
                ver_len = _decimal(version, ver)
                cid = self._id_buffer(name_len + ver_len + klen + 2)
                memcpy(cid, name, name_len)
                cid[name_len] = 58  # ":"
                memcpy(cid + name_len + 1, ver, ver_len)
                cid[name_len + 1 + ver_len] = 58
                memcpy(cid + name_len + ver_len + 2, key, klen)
                n = 0
                agg_vu_ptr(&vus[n], AGG_V_RKT, self.rkts[vid]); n += 1
                agg_vu_int(&vus[n], AGG_V_MSGFLAGS, vflags); n += 1
                agg_vu_mem(&vus[n], AGG_V_KEY, key, klen); n += 1
                agg_vu_mem(&vus[n], AGG_V_VALUE, data, dlen if dlen > 0 else 0); n += 1
                agg_vu_ptr(&vus[n], AGG_V_OPAQUE, <void *><uintptr_t>seq); n += 1
                hdrs = agg_ce_headers(cid, name_len + ver_len + klen + 2, src, src_len, key, klen,
                                      ver, ver_len, when, when_len,
                                      NULL if data == NULL else ct, ct_len)
                agg_vu_ptr(&vus[n], AGG_V_HEADERS, hdrs); n += 1
                err = agg_produceva(self.rk, vus, n)
                if err != NULL:
                    agg_headers_destroy(hdrs)  # a failed produce leaves them to the caller
                    code = agg_error_code(err)
                    msg = agg_error_string(err).decode(errors="replace")
                    agg_error_destroy(err)
                    if code == AGG_ERR_QUEUE_FULL:
                        break
                    from confluent_kafka import KafkaError, KafkaException
                    raise KafkaException(KafkaError(code, msg))
                self.sent = seq
                seq += 1
        finally:  # also when it raises after handing over some of the blob's events
            if vflags == 0 and self.sent != sent_before:
                self.held.append((self.sent, blob_obj))  # librdkafka reads the values there
        return self.sent

    def take_dropped(self) -> list:
        """(view id, key, version) of events skipped since the last call (no topic)."""
        out, self.dropped = self.dropped, []
        return out

    def poll(self) -> int:
        """Serve delivery reports; returns `delivered` (every change <= it delivered)."""
        if self.rk != NULL:
            agg_poll(self.rk, 0)
        cdef uint64_t d = self.delivered
        cdef uint8_t *done = self.tally.done
        cdef uint64_t mask = self.tally.mask
        while d < self.sent and done[(d + 1) & mask]:
            d += 1
            done[d & mask] = 0
        self.delivered = d
        held = self.held
        while held and held[0][0] <= d:  # every event produced from it delivered
            held.popleft()
        return d

    def flush(self, int timeout_ms) -> int:
        """Wait up to timeout_ms for what is outstanding (serving reports); returns
        `delivered`."""
        if self.rk != NULL:
            with nogil:
                agg_flush(self.rk, timeout_ms)
        return self.poll()

    @property
    def held_blobs(self) -> int:
        """Blobs held because librdkafka reads event values in them (not delivered yet)."""
        return len(self.held) if self.held is not None else 0

    @property
    def outstanding(self) -> int:
        """Messages librdkafka still holds (queued, in flight or with a report to serve)."""
        return agg_outq_len(self.rk) if self.rk != NULL else 0

    @property
    def fatal(self) -> str | None:
        """The producer's fatal error (it cannot produce any more: make a new one), or None."""
        cdef char errstr[512]
        if self.rk == NULL or agg_fatal_error(self.rk, errstr, sizeof(errstr)) == 0:
            return None
        return errstr.decode(errors="replace")

    @property
    def failed(self) -> int:
        return self.tally.failed

    @property
    def failed_reason(self) -> str:
        return agg_err2str(self.tally.failed_err).decode(errors="replace")

    @property
    def errors(self) -> int:
        return self.tally.errors

    @property
    def last_error(self) -> str:
        return (f"{agg_err2str(self.tally.last_err).decode(errors='replace')}: "
                f"{self.tally.last_reason.decode(errors='replace')}")

    def close(self) -> None:
        """Destroy the producer (what it still holds is dropped: flush first)."""
        self._destroy()

    cdef void _destroy(self) noexcept:
        cdef int i
        if self.rk != NULL:
            agg_purge(self.rk, AGG_PURGE_QUEUE | AGG_PURGE_INFLIGHT)
            agg_poll(self.rk, 0)
            for i in range(self.nviews):
                if self.rkts[i] != NULL:
                    agg_topic_destroy(self.rkts[i])
                    self.rkts[i] = NULL
            with nogil:
                agg_destroy(self.rk)
            self.rk = NULL
        if self.held is not None:  # librdkafka holds no value any more
            self.held.clear()

    def __dealloc__(self):
        self._destroy()
        free(self.tally.done)
        free(self.idbuf)


# ---- writing a blob: the compiled twin of changes.pack_blob_ref ----------------------------




cdef inline void _le16(unsigned char* p, unsigned int v) noexcept:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF


cdef inline void _le32(unsigned char* p, uint64_t v) noexcept:
    cdef int k
    for k in range(4):
        p[k] = (v >> (8 * k)) & 0xFF


cdef inline void _le64(unsigned char* p, uint64_t v) noexcept:
    cdef int k
    for k in range(8):
        p[k] = (v >> (8 * k)) & 0xFF


def pack_blob(rows, long long ms, bint is_json, Py_ssize_t first=0):
    """One commit's change events as one outbox value: changes.pack_blob_ref in two C
    passes (sizes, then one bytes object filled in place). Each row holds (view id, key,
    version, data) from index `first` on (the worker passes its (doc key, ...) rows whole).
    struct.error for a field outside its record's range, as the reference."""
    cdef list rl = rows if type(rows) is list else list(rows)
    cdef Py_ssize_t n = len(rl), i, total = BLOB_HEAD, klen, dlen
    cdef const char* kp
    cdef object row, data
    cdef tuple t
    cdef list datas = [None] * n
    cdef long vid
    cdef uint64_t version
    cdef bytes out
    cdef unsigned char* p
    if n > 0xFFFFFFFF:
        raise _struct.error("too many change events for one blob")
    for i in range(n):  # pass 1: check every field, sum the sizes
        row = rl[i]
        t = row if type(row) is tuple else tuple(row)
        if len(t) < first + 4:
            raise ValueError(f"change row of {len(t)} fields, {first + 4} needed")
        vid = t[first]
        if vid < 0 or vid > 0xFFFF:
            raise _struct.error(f"view id out of range: {vid}")
        PyUnicode_AsUTF8AndSize(t[first + 1], &klen)  # TypeError unless a str; cached
        if klen > 0xFFFFFFFF:
            raise _struct.error("change key too long")
        try:
            version = t[first + 2]
        except OverflowError as e:
            raise _struct.error(f"version out of range: {t[first + 2]}") from e
        data = t[first + 3]
        if data is not None:
            if type(data) is not bytes:
                data = bytes(memoryview(data))  # TypeError unless a buffer, as len()/join
            dlen = PyBytes_GET_SIZE(data)
            if dlen > 0x7FFFFFFF:
                raise _struct.error("change data too long")
            total += dlen
        datas[i] = data
        total += BLOB_REC + klen
    out = PyBytes_FromStringAndSize(NULL, total)
    p = <unsigned char*>PyBytes_AS_STRING(out)
    p[0] = BLOB_FORMAT
    p[1] = 1 if is_json else 0
    _le16(p + 2, 0)
    _le32(p + 4, <uint64_t>n)
    _le64(p + 8, <uint64_t>ms)
    p += BLOB_HEAD
    for i in range(n):  # pass 2: fill in place
        row = rl[i]
        t = row if type(row) is tuple else tuple(row)
        vid = t[first]
        kp = PyUnicode_AsUTF8AndSize(t[first + 1], &klen)
        version = t[first + 2]
        data = datas[i]
        _le16(p, <unsigned int>vid)
        _le32(p + 2, <uint64_t>klen)
        if data is None:
            _le32(p + 6, 0xFFFFFFFF)
            dlen = 0
        else:
            dlen = PyBytes_GET_SIZE(data)
            _le32(p + 6, <uint64_t>dlen)
        _le64(p + 10, version)
        p += BLOB_REC
        memcpy(p, kp, klen)
        p += klen
        if dlen:
            memcpy(p, PyBytes_AS_STRING(data), dlen)
            p += dlen
    return out


def stored_blob(bytes blob, rows, dict bodies, dict logged, uint64_t log_key,
                Py_ssize_t first=1):
    """changes.stored_blob_ref in two C passes over the blob (which records to leave out
    and the size, then one bytes object filled in place); the same bytes, or None."""
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(blob)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(blob), pos = BLOB_HEAD, end, total, i
    cdef list rl = rows if type(rows) is list else list(rows)
    cdef uint64_t n, klen, version
    cdef int32_t dlen
    cdef unsigned int vid
    cdef object row, dkey, data, body
    cdef tuple t, known
    cdef PyObject* hit
    cdef Py_ssize_t elided = 0
    if size < BLOB_HEAD or b[0] != BLOB_FORMAT or b[1] & (BLOB_LZ4 | BLOB_LOGGED) or \
            not b[1] & BLOB_JSON:
        return None
    n = _u(b + 4, 4)
    if <uint64_t>len(rl) != n:
        raise ValueError(f"{len(rl)} change rows for a blob of {n}")
    cdef bytearray keep = bytearray(n)  # 1: the record's data is left out
    total = BLOB_HEAD + 8
    for i in range(<Py_ssize_t>n):  # pass 1: which records, and the size
        if pos + BLOB_REC > size:
            raise ValueError("change outbox blob truncated")
        vid = <unsigned int>_u(b + pos, 2)
        klen = _u(b + pos + 2, 4)
        dlen = <int32_t>_u(b + pos + 6, 4)
        version = _u(b + pos + 10, 8)
        end = pos + BLOB_REC + <Py_ssize_t>klen + (dlen if dlen > 0 else 0)
        if end > size:
            raise ValueError("change outbox blob truncated")
        row = rl[i]
        t = row if type(row) is tuple else tuple(row)
        dkey = t[first - 1]
        data = t[first + 3]
        if dlen >= 0 and vid <= 0xFF and type(dkey) is bytes and \
                PyBytes_GET_SIZE(dkey) == <Py_ssize_t>klen + 3:
            hit = PyDict_GetItem(bodies, dkey)
            if hit is not NULL and type(<object>hit) is tuple and len(<tuple>hit) == 2:
                known = <tuple>hit
                body = known[1]
                if body is not None and known[0] == version and \
                        (body is data or body == data) and \
                        (<const unsigned char*>PyBytes_AS_STRING(dkey))[2] == vid and \
                        memcmp(PyBytes_AS_STRING(dkey) + 3, b + pos + BLOB_REC, klen) == 0:
                    hit = PyDict_GetItem(logged, dkey)
                    if hit is not NULL and <object>hit is not None:
                        keep[i] = 1
                        elided += 1
        total += (BLOB_REC + <Py_ssize_t>klen + 2) if keep[i] else end - pos
        pos = end
    if pos != size:
        raise ValueError("change outbox blob: trailing bytes")
    if elided == 0:
        return None
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    memcpy(p, b, BLOB_HEAD)
    p[1] |= BLOB_LOGGED
    _le64(p + BLOB_HEAD, log_key)
    p += BLOB_HEAD + 8
    pos = BLOB_HEAD
    for i in range(<Py_ssize_t>n):  # pass 2: fill in place
        klen = _u(b + pos + 2, 4)
        dlen = <int32_t>_u(b + pos + 6, 4)
        end = pos + BLOB_REC + <Py_ssize_t>klen + (dlen if dlen > 0 else 0)
        if keep[i]:
            memcpy(p, b + pos, BLOB_REC + klen)
            _le32(p + 6, <uint64_t><uint32_t>(<int32_t>-2))
            p += BLOB_REC + klen
            row = rl[i]
            dkey = row[first - 1]
            memcpy(p, PyBytes_AS_STRING(dkey), 2)
            p += 2
        else:
            memcpy(p, b + pos, end - pos)
            p += end - pos
        pos = end
    return out
