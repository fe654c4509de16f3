/*
 * shardkit.ring._speedups: the C copy of shardkit/ring/_lookup_py.py.
 *
 * Same names, same signatures, same answers as the pure-Python module (which
 * is the specification; the key encoding is specified in _keys.py).  One call
 * encodes a key, hashes it with MurmurHash3 x86 32-bit (seed 0) and finds its
 * owner by binary search over a sorted uint32 array of ring points (or by
 * indexing the bucket table), for one key (Lookup.get) or a batch
 * (Lookup.get_many).
 *
 * Storage: the Lookup holds buffer views on the arrays HashRing owns (no
 * copy): 4 bytes per point + 2 bytes per owner slot ('H', up to 65535
 * aliases) or 4 ('I'): 6 bytes per ring point (8 beyond 65535 aliases).
 *
 * Refused keys: the C code never builds an error message itself; it calls
 * shardkit.ring._keys.encode_key(key), which raises the specified
 * InvalidKeyError, so both implementations fail with the same error.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define TAG_INT 0x01
#define TAG_STR 0x02
#define TAG_BYTES 0x03
#define TAG_UUID 0x04

static PyObject *uuid_type = NULL;      /* uuid.UUID */
static PyObject *py_encode_key = NULL;  /* shardkit.ring._keys.encode_key (error path) */
static PyObject *py_invalid_key = NULL; /* shardkit.ring._keys.invalid_key (error path) */
static PyObject *str_int = NULL;        /* interned "int" */

/* ---------------------------------------------------------------- murmur3 */

static inline uint32_t rotl32(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

static inline uint32_t fmix32(uint32_t h)
{
    h ^= h >> 16;
    h *= 0x85ebca6bU;
    h ^= h >> 13;
    h *= 0xc2b2ae35U;
    h ^= h >> 16;
    return h;
}

#define MM_C1 0xcc9e2d51U
#define MM_C2 0x1b873593U

static inline uint32_t mix_k1(uint32_t k1)
{
    k1 *= MM_C1;
    k1 = rotl32(k1, 15);
    k1 *= MM_C2;
    return k1;
}

static inline uint32_t mix_h1(uint32_t h1, uint32_t k1)
{
    h1 ^= mix_k1(k1);
    h1 = rotl32(h1, 13);
    return h1 * 5 + 0xe6546b64U;
}

static inline uint32_t load_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* MurmurHash3_x86_32(tag + data, seed 0) without building the concatenation:
 * the virtual buffer is one tag byte followed by len bytes of data; blocks
 * are read little-endian (what mmh3 computes on every little-endian host). */
static uint32_t murmur3_tagged(uint8_t tag, const uint8_t *data, Py_ssize_t len)
{
    const size_t total = (size_t)len + 1;
    const size_t nblocks = total / 4;
    uint32_t h1 = 0;
    size_t i;

    if (nblocks > 0) {
        h1 = mix_h1(h1, (uint32_t)tag | ((uint32_t)data[0] << 8) | ((uint32_t)data[1] << 16) |
                            ((uint32_t)data[2] << 24));
        for (i = 1; i < nblocks; i++)
            h1 = mix_h1(h1, load_le32(data + 4 * i - 1));
    }
    {
        /* tail: the last total % 4 virtual bytes */
        uint32_t k1 = 0;
        size_t rem = total & 3;
        size_t start = nblocks * 4; /* virtual index of the first tail byte */
        uint8_t b[3];
        size_t j;
        for (j = 0; j < rem; j++)
            b[j] = (start + j == 0) ? tag : data[start + j - 1];
        switch (rem) {
        case 3:
            k1 ^= (uint32_t)b[2] << 16;
            /* fall through */
        case 2:
            k1 ^= (uint32_t)b[1] << 8;
            /* fall through */
        case 1:
            k1 ^= (uint32_t)b[0];
            h1 ^= mix_k1(k1);
        }
    }
    h1 ^= (uint32_t)total;
    return fmix32(h1);
}

/* ------------------------------------------------------------ key encoding */

/* Raise the specified InvalidKeyError for key (via _keys.encode_key).
 * Always returns -1 with an exception set. */
static int load_helpers(void)
{
    PyObject *mod;
    if (py_encode_key != NULL)
        return 0;
    mod = PyImport_ImportModule("shardkit.ring._keys");
    if (mod == NULL)
        return -1;
    py_encode_key = PyObject_GetAttrString(mod, "encode_key");
    py_invalid_key = PyObject_GetAttrString(mod, "invalid_key");
    Py_DECREF(mod);
    if (py_encode_key == NULL || py_invalid_key == NULL) {
        Py_CLEAR(py_encode_key);
        Py_CLEAR(py_invalid_key);
        return -1;
    }
    return 0;
}

static int refuse_key(PyObject *key)
{
    PyObject *res;
    if (load_helpers() < 0)
        return -1;
    res = PyObject_CallOneArg(py_encode_key, key);
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    PyErr_Format(PyExc_SystemError,
                 "shardkit.ring._speedups refused the key %R that the Python specification accepts", key);
    return -1;
}

static int uuid_bytes(PyObject *key, uint8_t out[16])
{
    PyObject *value = PyObject_GetAttr(key, str_int);
    int rc;
    if (value == NULL)
        return -1;
    if (!PyLong_Check(value)) {
        Py_DECREF(value);
        PyErr_SetString(PyExc_TypeError, "UUID.int is not an int");
        return -1;
    }
#if PY_VERSION_HEX >= 0x030D0000
    {
        Py_ssize_t n = PyLong_AsNativeBytes(value, out, 16,
                                            Py_ASNATIVEBYTES_BIG_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER |
                                                Py_ASNATIVEBYTES_REJECT_NEGATIVE);
        rc = (n < 0) ? -1 : (n > 16 ? (PyErr_SetString(PyExc_OverflowError, "UUID.int too large"), -1) : 0);
    }
#else
    rc = _PyLong_AsByteArray((PyLongObject *)value, out, 16, 0, 0);
#endif
    Py_DECREF(value);
    return rc;
}

/* Hash a key per the specification.  Returns 0 and sets *h, or -1 with an
 * exception set. */
static int hash_key(PyObject *key, uint32_t *h)
{
    if (PyUnicode_Check(key)) {
        Py_ssize_t len;
        const char *data = PyUnicode_AsUTF8AndSize(key, &len);
        if (data == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
                return -1;
            PyErr_Clear();
            return refuse_key(key);
        }
        *h = murmur3_tagged(TAG_STR, (const uint8_t *)data, len);
        return 0;
    }
    if (PyLong_Check(key)) {
        int overflow = 0;
        long long v;
        uint64_t u;
        uint8_t buf[8];
        int i;
        if (PyBool_Check(key))
            return refuse_key(key);
        v = PyLong_AsLongLongAndOverflow(key, &overflow);
        if (overflow)
            return refuse_key(key);
        if (v == -1 && PyErr_Occurred())
            return -1;
        u = (uint64_t)v;
        for (i = 7; i >= 0; i--) {
            buf[i] = (uint8_t)(u & 0xff);
            u >>= 8;
        }
        *h = murmur3_tagged(TAG_INT, buf, 8);
        return 0;
    }
    if (PyBytes_Check(key)) {
        *h = murmur3_tagged(TAG_BYTES, (const uint8_t *)PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key));
        return 0;
    }
    if (PyObject_TypeCheck(key, (PyTypeObject *)uuid_type)) {
        uint8_t buf[16];
        if (uuid_bytes(key, buf) < 0)
            return -1;
        *h = murmur3_tagged(TAG_UUID, buf, 16);
        return 0;
    }
    return refuse_key(key);
}

static PyObject *speedups_hash_key(PyObject *module, PyObject *key)
{
    uint32_t h;
    if (hash_key(key, &h) < 0)
        return NULL;
    return PyLong_FromUnsignedLong((unsigned long)h);
}

static PyObject *speedups_encode_key(PyObject *module, PyObject *key)
{
    if (PyUnicode_Check(key)) {
        Py_ssize_t len;
        const char *data = PyUnicode_AsUTF8AndSize(key, &len);
        PyObject *out;
        if (data == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
                return NULL;
            PyErr_Clear();
            refuse_key(key);
            return NULL;
        }
        out = PyBytes_FromStringAndSize(NULL, len + 1);
        if (out == NULL)
            return NULL;
        PyBytes_AS_STRING(out)[0] = TAG_STR;
        memcpy(PyBytes_AS_STRING(out) + 1, data, (size_t)len);
        return out;
    }
    if (PyLong_Check(key)) {
        int overflow = 0;
        long long v;
        uint64_t u;
        char buf[9];
        int i;
        if (PyBool_Check(key)) {
            refuse_key(key);
            return NULL;
        }
        v = PyLong_AsLongLongAndOverflow(key, &overflow);
        if (overflow) {
            refuse_key(key);
            return NULL;
        }
        if (v == -1 && PyErr_Occurred())
            return NULL;
        u = (uint64_t)v;
        buf[0] = TAG_INT;
        for (i = 8; i >= 1; i--) {
            buf[i] = (char)(u & 0xff);
            u >>= 8;
        }
        return PyBytes_FromStringAndSize(buf, 9);
    }
    if (PyBytes_Check(key)) {
        Py_ssize_t len = PyBytes_GET_SIZE(key);
        PyObject *out = PyBytes_FromStringAndSize(NULL, len + 1);
        if (out == NULL)
            return NULL;
        PyBytes_AS_STRING(out)[0] = TAG_BYTES;
        memcpy(PyBytes_AS_STRING(out) + 1, PyBytes_AS_STRING(key), (size_t)len);
        return out;
    }
    if (PyObject_TypeCheck(key, (PyTypeObject *)uuid_type)) {
        uint8_t buf[17];
        buf[0] = TAG_UUID;
        if (uuid_bytes(key, buf + 1) < 0)
            return NULL;
        return PyBytes_FromStringAndSize((const char *)buf, 17);
    }
    refuse_key(key);
    return NULL;
}

/* ------------------------------------------------------------------ Lookup */

typedef struct {
    PyObject_HEAD
    PyObject *aliases;   /* tuple: slot -> alias */
    Py_buffer owners_view;
    Py_buffer points_view; /* .obj == NULL in bucket mode */
    const uint32_t *points;
    const void *owners;
    int owner_wide; /* owners are uint32 (else uint16) */
    Py_ssize_t n;
    /* Ring mode only: an O(1) first step.  The hash space is cut into
     * 2**prefix_bits equal ranges; prefix[j] is the index of the first point
     * at or after the start of range j (prefix[nprefix] == n).  A lookup then
     * searches only the few points of one range (about 4 on average). */
    uint32_t *prefix;
    Py_ssize_t nprefix;
    int prefix_shift; /* 32 - prefix_bits, applied to a 64-bit hash */
} LookupObject;

static inline Py_ssize_t owner_at(const LookupObject *self, Py_ssize_t i)
{
    return self->owner_wide ? (Py_ssize_t)((const uint32_t *)self->owners)[i]
                            : (Py_ssize_t)((const uint16_t *)self->owners)[i];
}

/* Position of the point or bucket that owns hash h. */
static inline Py_ssize_t locate(const LookupObject *self, uint32_t h)
{
    if (self->points == NULL)
        return (Py_ssize_t)(((uint64_t)h * (uint64_t)self->n) >> 32);
    {
        /* bisect_left: first index with points[i] >= h, wrapping to 0.  Every
         * point before prefix[j] is below h and prefix[j + 1] is at or above
         * it, so the answer lies in [prefix[j], prefix[j + 1]]. */
        const uint32_t *p = self->points;
        Py_ssize_t j = (Py_ssize_t)((uint64_t)h >> self->prefix_shift);
        Py_ssize_t lo = self->prefix[j], hi = self->prefix[j + 1];
        /* a range holds a handful of points: a branch-free halving search
         * (no mispredicted branches), then one last comparison */
        Py_ssize_t len = hi - lo;
        while (len > 1) {
            Py_ssize_t half = len >> 1;
            lo = (p[lo + half - 1] < h) ? lo + half : lo;
            len -= half;
        }
        if (len == 1 && p[lo] < h)
            lo++;
        return lo == self->n ? 0 : lo;
    }
}

/* Build the prefix table: the smallest power of two of ranges that leaves
 * at most 4 points per range on average (so it costs under 2 bytes per
 * point), capped at 2**20 ranges.  Points must be sorted, as HashRing makes
 * them; an unsorted array still gives memory-safe (if meaningless) answers,
 * since every entry stays within [0, n]. */
static int build_prefix(LookupObject *self)
{
    Py_ssize_t nb = 1, i = 0, j;
    int bits = 0;
    while (nb * 4 < self->n && bits < 20) {
        nb <<= 1;
        bits++;
    }
    self->prefix = (uint32_t *)PyMem_Malloc((size_t)(nb + 1) * sizeof(uint32_t));
    if (self->prefix == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->nprefix = nb;
    self->prefix_shift = 32 - bits;
    /* count the points of each range, then a running sum: prefix[j] is the
     * number of points below range j, i.e. the index of its first point */
    memset(self->prefix, 0, (size_t)(nb + 1) * sizeof(uint32_t));
    for (i = 0; i < self->n; i++)
        self->prefix[((uint64_t)self->points[i] >> self->prefix_shift) + 1]++;
    for (j = 1; j <= nb; j++)
        self->prefix[j] += self->prefix[j - 1];
    return 0;
}

#define GET_MANY_BLOCK 32

/* A hint only: start loading the first table line a lookup of h will read. */
static inline void prefetch_for(const LookupObject *self, uint32_t h)
{
#if defined(__GNUC__) || defined(__clang__)
    if (self->points == NULL) {
        Py_ssize_t i = (Py_ssize_t)(((uint64_t)h * (uint64_t)self->n) >> 32);
        __builtin_prefetch(self->owner_wide ? (const void *)((const uint32_t *)self->owners + i)
                                            : (const void *)((const uint16_t *)self->owners + i));
    }
    else {
        __builtin_prefetch(self->prefix + ((uint64_t)h >> self->prefix_shift));
    }
#else
    (void)self;
    (void)h;
#endif
}

static int check_buffer(Py_buffer *view, const char *what, int allow_h)
{
    const char *fmt = view->format ? view->format : "B";
    if (fmt[0] == '@' || fmt[0] == '=')
        fmt++;
    if (view->ndim != 1 || fmt[1] != '\0' || !(fmt[0] == 'I' || (allow_h && fmt[0] == 'H')) ||
        view->itemsize != (fmt[0] == 'I' ? 4 : 2)) {
        PyErr_Format(PyExc_TypeError, "%s must be an array of typecode %s", what, allow_h ? "'H' or 'I'" : "'I'");
        return -1;
    }
    return 0;
}

static int Lookup_init(LookupObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"aliases", "owners", "points", NULL};
    PyObject *aliases, *owners, *points = Py_None;
    Py_ssize_t i, nalias;

    if (self->aliases != NULL) {
        PyErr_SetString(PyExc_TypeError, "Lookup objects are immutable");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O:Lookup", kwlist, &aliases, &owners, &points))
        return -1;
    if (!PyTuple_Check(aliases)) {
        PyErr_SetString(PyExc_TypeError, "aliases must be a tuple");
        return -1;
    }
    if (PyObject_GetBuffer(owners, &self->owners_view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (check_buffer(&self->owners_view, "owners", 1) < 0)
        goto fail;
    self->owner_wide = self->owners_view.itemsize == 4;
    self->owners = self->owners_view.buf;
    self->n = self->owners_view.len / self->owners_view.itemsize;
    if (points != Py_None) {
        if (PyObject_GetBuffer(points, &self->points_view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
            goto fail;
        if (check_buffer(&self->points_view, "points", 0) < 0)
            goto fail;
        if (self->points_view.len / 4 != self->n) {
            PyErr_SetString(PyExc_ValueError, "points and owners must have the same length");
            goto fail;
        }
        self->points = (const uint32_t *)self->points_view.buf;
    }
    if (self->points != NULL && self->n > 0 && build_prefix(self) < 0)
        goto fail;
    if (self->n == 0) {
        PyErr_SetString(PyExc_ValueError, "a Lookup needs at least one point or bucket");
        goto fail;
    }
    /* memory safety: every owner slot must index the aliases tuple */
    nalias = PyTuple_GET_SIZE(aliases);
    for (i = 0; i < self->n; i++) {
        if (owner_at(self, i) >= nalias) {
            PyErr_Format(PyExc_ValueError, "owner slot %zd out of range of %zd aliases", owner_at(self, i), nalias);
            goto fail;
        }
    }
    Py_INCREF(aliases);
    self->aliases = aliases;
    return 0;
fail:
    PyMem_Free(self->prefix);
    self->prefix = NULL;
    self->nprefix = 0;
    if (self->points_view.obj)
        PyBuffer_Release(&self->points_view);
    if (self->owners_view.obj)
        PyBuffer_Release(&self->owners_view);
    self->points = NULL;
    self->owners = NULL;
    self->n = 0;
    return -1;
}

static void Lookup_dealloc(LookupObject *self)
{
    PyObject_GC_UnTrack(self);
    PyMem_Free(self->prefix);
    self->prefix = NULL;
    if (self->points_view.obj)
        PyBuffer_Release(&self->points_view);
    if (self->owners_view.obj)
        PyBuffer_Release(&self->owners_view);
    Py_CLEAR(self->aliases);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Lookup_traverse(LookupObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->aliases);
    Py_VISIT(self->owners_view.obj);
    Py_VISIT(self->points_view.obj);
    return 0;
}

static int ready(LookupObject *self)
{
    if (self->aliases == NULL) {
        PyErr_SetString(PyExc_ValueError, "Lookup was not initialised");
        return -1;
    }
    return 0;
}

static PyObject *Lookup_owner_index(LookupObject *self, PyObject *key)
{
    uint32_t h;
    if (ready(self) < 0 || hash_key(key, &h) < 0)
        return NULL;
    return PyLong_FromSsize_t(owner_at(self, locate(self, h)));
}

static PyObject *Lookup_get(LookupObject *self, PyObject *key)
{
    uint32_t h;
    PyObject *alias;
    if (ready(self) < 0 || hash_key(key, &h) < 0)
        return NULL;
    alias = PyTuple_GET_ITEM(self->aliases, owner_at(self, locate(self, h)));
    Py_INCREF(alias);
    return alias;
}

static PyObject *Lookup_get_many(LookupObject *self, PyObject *keys)
{
    PyObject *seq, *out, **items;
    Py_ssize_t i, n;
    if (ready(self) < 0)
        return NULL;
    if (PyUnicode_Check(keys) || PyBytes_Check(keys)) {
        if (load_helpers() < 0)
            return NULL;
        {
            PyObject *err = PyObject_CallFunction(
                py_invalid_key, "Os", keys, "get_many() takes an iterable of keys, not a single str or bytes");
            if (err == NULL)
                return NULL;
            PyErr_SetObject((PyObject *)Py_TYPE(err), err);
            Py_DECREF(err);
            return NULL;
        }
    }
    seq = PySequence_Fast(keys, "get_many() takes an iterable of keys");
    if (seq == NULL)
        return NULL;
    n = PySequence_Fast_GET_SIZE(seq);
    out = PyList_New(n);
    if (out == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    items = PySequence_Fast_ITEMS(seq);
    /* In blocks: hash every key of a block first and ask the CPU for the
     * table lines those hashes will read, so a large ring's cache misses
     * overlap instead of being paid one after the other. */
    for (i = 0; i < n; i += GET_MANY_BLOCK) {
        uint32_t hs[GET_MANY_BLOCK];
        Py_ssize_t b, m = n - i < GET_MANY_BLOCK ? n - i : GET_MANY_BLOCK;
        for (b = 0; b < m; b++) {
            if (hash_key(items[i + b], &hs[b]) < 0) {
                Py_DECREF(out);
                Py_DECREF(seq);
                return NULL;
            }
            prefetch_for(self, hs[b]);
        }
#if defined(__GNUC__) || defined(__clang__)
        if (self->points != NULL) /* second wave: the points each search starts from */
            for (b = 0; b < m; b++)
                __builtin_prefetch(self->points + self->prefix[(uint64_t)hs[b] >> self->prefix_shift]);
#endif
        for (b = 0; b < m; b++) {
            PyObject *alias = PyTuple_GET_ITEM(self->aliases, owner_at(self, locate(self, hs[b])));
            Py_INCREF(alias);
            PyList_SET_ITEM(out, i + b, alias);
        }
    }
    Py_DECREF(seq);
    return out;
}

static PyObject *Lookup_get_nbytes(LookupObject *self, void *closure)
{
    Py_ssize_t size = self->owners_view.obj ? self->owners_view.len : 0;
    if (self->points_view.obj)
        size += self->points_view.len;
    if (self->prefix != NULL)
        size += (self->nprefix + 1) * (Py_ssize_t)sizeof(uint32_t);
    return PyLong_FromSsize_t(size);
}

static Py_ssize_t Lookup_len(LookupObject *self) { return self->n; }

static PyMethodDef Lookup_methods[] = {
    {"get", (PyCFunction)Lookup_get, METH_O, "get(key) -> alias that owns key."},
    {"get_many", (PyCFunction)Lookup_get_many, METH_O, "get_many(keys) -> [get(k) for k in keys]."},
    {"owner_index", (PyCFunction)Lookup_owner_index, METH_O, "owner_index(key) -> owner slot of key."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Lookup_getset[] = {
    {"nbytes", (getter)Lookup_get_nbytes, NULL, "Bytes used by the point/owner arrays.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods Lookup_as_sequence = {
    .sq_length = (lenfunc)Lookup_len,
};

static PyTypeObject LookupType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shardkit.ring._speedups.Lookup",
    .tp_basicsize = sizeof(LookupObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Lookup(aliases, owners, points=None): one ring layout, ready for lookups.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Lookup_init,
    .tp_dealloc = (destructor)Lookup_dealloc,
    .tp_traverse = (traverseproc)Lookup_traverse,
    .tp_methods = Lookup_methods,
    .tp_getset = Lookup_getset,
    .tp_as_sequence = &Lookup_as_sequence,
};

/* ------------------------------------------------------------------ module */

static PyMethodDef module_methods[] = {
    {"encode_key", (PyCFunction)speedups_encode_key, METH_O, "encode_key(key) -> the canonical bytes of key."},
    {"hash_key", (PyCFunction)speedups_hash_key, METH_O, "hash_key(key) -> MurmurHash3 x86 32 of encode_key(key)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shardkit.ring._speedups",
    .m_doc = "C copy of shardkit.ring._lookup_py (same names, same answers).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    PyObject *m, *uuid_mod;
    if (PyType_Ready(&LookupType) < 0)
        return NULL;
    uuid_mod = PyImport_ImportModule("uuid");
    if (uuid_mod == NULL)
        return NULL;
    uuid_type = PyObject_GetAttrString(uuid_mod, "UUID");
    Py_DECREF(uuid_mod);
    if (uuid_type == NULL)
        return NULL;
    if (!PyType_Check(uuid_type)) {
        PyErr_SetString(PyExc_ImportError, "uuid.UUID is not a type");
        return NULL;
    }
    str_int = PyUnicode_InternFromString("int");
    if (str_int == NULL)
        return NULL;
    m = PyModule_Create(&speedups_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&LookupType);
    if (PyModule_AddObject(m, "Lookup", (PyObject *)&LookupType) < 0) {
        Py_DECREF(&LookupType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
