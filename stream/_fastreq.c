/* stream._fastreq: the canonical request decoder of the serving hot path (stream/events.py).
 *
 * Why: msgspec builds a Python object per value (76 floats, 32 strings and a struct per
 * canonical request) that numpy then copies; that was ~12 us of a ~30 us request. This parser
 * writes the numbers straight into the float32 matrix and the categoricals' vocabulary ids
 * straight into an int64 matrix; the only objects it makes are the request id and the strings
 * of categorical values outside the vocabulary (vocabulary words are shared, not copied).
 *
 * Contract: it ACCEPTS only a strict subset of valid requests, and for those it gives exactly
 * the row today's Python path gives. Everything else -- any syntax it does not take (escapes,
 * integers as categoricals, unknown or duplicate names, positional requests, odd numbers,
 * anything invalid) -- is REJECTED (ok[i] = 0), and the caller decodes those messages with the
 * Python path, which words the error. So a rejection is never an error by itself, and hostile
 * input costs a bounded scan: no recursion, no allocation beyond one string per value.
 *
 * Numbers: JSON grammar checked here; <= 15 significant digits with a decimal exponent within
 * +-22 are exact in one IEEE operation (Clinger's fast path); others go through CPython's
 * correctly rounded PyOS_string_to_double. Then double -> float32 (round to nearest), as numpy's
 * astype does. A value beyond float32 or float64, and a negative integer zero, are rejected.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_RID_CHARS 256
#define MAX_TS ((uint64_t)INT64_MAX)

/* ------------------------------------------------------------------ byte-string hash tables */

typedef struct {
    const char *key; /* UTF-8 bytes, owned by `blob` of the table's owner */
    Py_ssize_t len;
    uint64_t hash;
    int64_t value;   /* feature index, or vocabulary union id */
    PyObject *obj;   /* the word's str (vocabulary tables), borrowed from `words` */
} slot_t;

typedef struct {
    slot_t *slots;
    size_t mask; /* capacity - 1 (a power of two) */
} table_t;

static inline uint64_t hash_bytes(const char *s, Py_ssize_t n)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (Py_ssize_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    return h ^ (h >> 29);
}

static int table_init(table_t *t, Py_ssize_t count)
{
    size_t cap = 8;
    while (cap < (size_t)count * 2 + 1)
        cap <<= 1;
    t->slots = PyMem_Calloc(cap, sizeof(slot_t));
    if (!t->slots) {
        PyErr_NoMemory();
        return -1;
    }
    t->mask = cap - 1;
    return 0;
}

/* Insert; returns 1 if the key was present already (value kept), 0 if added. */
static int table_put(table_t *t, const char *key, Py_ssize_t len, int64_t value, PyObject *obj)
{
    uint64_t h = hash_bytes(key, len);
    size_t i = (size_t)h & t->mask;
    while (t->slots[i].key) {
        slot_t *s = &t->slots[i];
        if (s->hash == h && s->len == len && memcmp(s->key, key, (size_t)len) == 0)
            return 1;
        i = (i + 1) & t->mask;
    }
    t->slots[i].key = key;
    t->slots[i].len = len;
    t->slots[i].hash = h;
    t->slots[i].value = value;
    t->slots[i].obj = obj;
    return 0;
}

static inline const slot_t *table_get(const table_t *t, const char *key, Py_ssize_t len)
{
    uint64_t h = hash_bytes(key, len);
    size_t i = (size_t)h & t->mask;
    while (t->slots[i].key) {
        const slot_t *s = &t->slots[i];
        if (s->hash == h && s->len == len && memcmp(s->key, key, (size_t)len) == 0)
            return s;
        i = (i + 1) & t->mask;
    }
    return NULL;
}

/* ------------------------------------------------------------------ the Decoder object */

typedef struct {
    PyObject_HEAD
    Py_ssize_t n_num, n_cat;
    PyObject *names;      /* tuple of str: numeric + categorical names */
    const char **name_ptr; /* UTF-8 of each name (owned by the str objects) */
    Py_ssize_t *name_len;
    table_t names_t;
    int ready;            /* set only when __init__ completed: decode refuses a half-made Decoder */
    int has_vocab;
    PyObject *words;      /* tuple of str: vocabulary words (kept alive: tables point into them;
                             a copy, so a caller's later change to its list frees none of them) */
    table_t vocab_t;
    int64_t unknown_id, missing_id;
    PyObject *empty;      /* "" */
} Decoder;

static void Decoder_dealloc(Decoder *self)
{
    PyMem_Free(self->name_ptr);
    PyMem_Free(self->name_len);
    PyMem_Free(self->names_t.slots);
    PyMem_Free(self->vocab_t.slots);
    Py_XDECREF(self->names);
    Py_XDECREF(self->words);
    Py_XDECREF(self->empty);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Decoder(numeric: tuple[str], categorical: tuple[str], words: list[str] | None,
 *         word_ids: list[int] | None, unknown_id: int = 0, missing_id: int = 0) */
static int Decoder_init(Decoder *self, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"numeric", "categorical", "words", "word_ids", "unknown_id", "missing_id", NULL};
    PyObject *numeric, *categorical, *words = Py_None, *word_ids = Py_None;
    long long unknown_id = 0, missing_id = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!|OOLL", kw, &PyTuple_Type, &numeric,
                                     &PyTuple_Type, &categorical, &words, &word_ids,
                                     &unknown_id, &missing_id))
        return -1;
    if (self->names || self->ready) {
        PyErr_SetString(PyExc_TypeError, "Decoder is initialised once");
        return -1;
    }
    self->n_num = PyTuple_GET_SIZE(numeric);
    self->n_cat = PyTuple_GET_SIZE(categorical);
    self->names = PySequence_Concat(numeric, categorical);
    if (!self->names)
        return -1;
    Py_ssize_t n = self->n_num + self->n_cat;
    self->name_ptr = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    self->name_len = PyMem_Calloc((size_t)n + 1, sizeof(Py_ssize_t));
    if (!self->name_ptr || !self->name_len) {
        PyErr_NoMemory();
        return -1;
    }
    if (table_init(&self->names_t, n) < 0)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(self->names, i);
        if (!PyUnicode_Check(name)) {
            PyErr_SetString(PyExc_TypeError, "feature names must be str");
            return -1;
        }
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(name, &len);
        if (!s)
            return -1;
        self->name_ptr[i] = s;
        self->name_len[i] = len;
        if (table_put(&self->names_t, s, len, i, NULL)) {
            PyErr_SetString(PyExc_ValueError, "duplicate feature name");
            return -1;
        }
    }
    self->empty = PyUnicode_FromStringAndSize("", 0);
    if (!self->empty)
        return -1;
    self->unknown_id = unknown_id;
    self->missing_id = missing_id;
    if (words != Py_None) {
        if (!PyList_Check(words) || !PyList_Check(word_ids) ||
            PyList_GET_SIZE(words) != PyList_GET_SIZE(word_ids)) {
            PyErr_SetString(PyExc_TypeError, "words and word_ids must be lists of one length");
            return -1;
        }
        self->words = PyList_AsTuple(words);
        if (!self->words)
            return -1;
        self->has_vocab = 1;
        Py_ssize_t m = PyTuple_GET_SIZE(self->words);
        if (table_init(&self->vocab_t, m) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < m; i++) {
            PyObject *w = PyTuple_GET_ITEM(self->words, i);
            if (!PyUnicode_Check(w)) {
                PyErr_SetString(PyExc_TypeError, "vocabulary words must be str");
                return -1;
            }
            long long id = PyLong_AsLongLong(PyList_GET_ITEM(word_ids, i));
            if (id == -1 && PyErr_Occurred())
                return -1;
            Py_ssize_t len;
            const char *s = PyUnicode_AsUTF8AndSize(w, &len);
            if (!s)
                return -1;
            if (len == 0) {
                PyErr_SetString(PyExc_ValueError, "the vocabulary holds ''");
                return -1;
            }
            if (table_put(&self->vocab_t, s, len, id, w)) {
                PyErr_SetString(PyExc_ValueError, "duplicate vocabulary word");
                return -1;
            }
        }
    }
    self->ready = 1;
    return 0;
}

/* ------------------------------------------------------------------ the parser */

typedef struct {
    const char *p, *end;
} cur_t;

static inline void skip_ws(cur_t *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t'))
        c->p++;
}

/* A string without escapes or control characters: [*s, *s + *len) between the quotes.
 * Returns 0, or -1 (reject: not such a string). */
static inline int scan_string(cur_t *c, const char **s, Py_ssize_t *len)
{
    if (c->p >= c->end || *c->p != '"')
        return -1;
    const char *start = ++c->p;
    const char *q = memchr(start, '"', (size_t)(c->end - start));
    if (!q)
        return -1;
    for (const char *r = start; r < q; r++) {
        unsigned char ch = (unsigned char)*r;
        if (ch < 0x20 || ch == '\\')
            return -1;
    }
    *s = start;
    *len = q - start;
    c->p = q + 1;
    return 0;
}

static const double POW10[] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
                               1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* A JSON number -> double. Returns 0, or -1 (reject). *is_int: no fraction or exponent. */
static inline int parse_number(cur_t *c, double *out, int *is_int)
{
    const char *start = c->p, *p = c->p, *end = c->end;
    int neg = 0;
    if (p < end && *p == '-') {
        neg = 1;
        p++;
    }
    if (p >= end)
        return -1;
    uint64_t m = 0;
    int sig = 0;        /* significant digits in m */
    int dropped = 0;    /* significant digits beyond what m holds */
    int exp10 = 0;
    if (*p == '0') {
        p++;
        if (p < end && *p >= '0' && *p <= '9')
            return -1; /* leading zero */
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') {
            if (sig < 19) {
                m = m * 10 + (uint64_t)(*p - '0');
                sig++;
            } else {
                dropped++;
            }
            p++;
        }
    } else {
        return -1;
    }
    exp10 = dropped;
    *is_int = 1;
    if (p < end && *p == '.') {
        p++;
        *is_int = 0;
        if (p >= end || *p < '0' || *p > '9')
            return -1;
        while (p < end && *p >= '0' && *p <= '9') {
            if (m == 0 && *p == '0') {
                exp10--; /* leading zeros of a fraction are not significant */
            } else if (sig < 19) {
                m = m * 10 + (uint64_t)(*p - '0');
                sig++;
                exp10--;
            } else {
                dropped++;
            }
            p++;
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        *is_int = 0;
        int eneg = 0;
        if (p < end && (*p == '+' || *p == '-')) {
            eneg = (*p == '-');
            p++;
        }
        if (p >= end || *p < '0' || *p > '9')
            return -1;
        int e = 0;
        while (p < end && *p >= '0' && *p <= '9') {
            if (e < 100000)
                e = e * 10 + (*p - '0');
            p++;
        }
        exp10 += eneg ? -e : e;
    }
    if (*is_int && neg && m == 0)
        return -1; /* "-0": today's paths disagree on its sign; let the Python path decide */
    double d;
    if (dropped == 0 && sig <= 15 && exp10 >= -22 && exp10 <= 22) {
        d = (double)m;
        if (exp10 < 0)
            d /= POW10[-exp10];
        else
            d *= POW10[exp10];
        if (neg)
            d = -d;
    } else if (m == 0) {
        d = neg ? -0.0 : 0.0;
    } else {
        /* correctly rounded; the span is checked JSON, and a bytes object ends in NUL */
        char buf[64];
        const char *src = start;
        Py_ssize_t n = p - start;
        char *heap = NULL;
        if (n < (Py_ssize_t)sizeof(buf)) {
            memcpy(buf, start, (size_t)n);
            buf[n] = 0;
            src = buf;
        } else {
            heap = PyMem_Malloc((size_t)n + 1);
            if (!heap)
                return -1;
            memcpy(heap, start, (size_t)n);
            heap[n] = 0;
            src = heap;
        }
        char *stop = NULL;
        d = PyOS_string_to_double(src, &stop, NULL);
        int bad = (d == -1.0 && PyErr_Occurred()) || stop != src + n;
        PyErr_Clear();
        PyMem_Free(heap);
        if (bad)
            return -1;
    }
    if (!isfinite(d))
        return -1;
    *out = d;
    c->p = p;
    return 0;
}

/* After a value: whitespace, then ',' (1) or '}' (0); -1 otherwise. */
static inline int next_member(cur_t *c)
{
    skip_ws(c);
    if (c->p >= c->end)
        return -1;
    if (*c->p == ',') {
        c->p++;
        return 1;
    }
    if (*c->p == '}') {
        c->p++;
        return 0;
    }
    return -1;
}

static inline int literal_null(cur_t *c)
{
    if (c->end - c->p >= 4 && memcmp(c->p, "null", 4) == 0) {
        c->p += 4;
        return 1;
    }
    return 0;
}

/* The features object into one row. Returns 0, or -1 (reject). cat_row gets new references
 * (the caller releases them either way). */
static int parse_features(Decoder *self, cur_t *c, float *num_row, int64_t *id_row, PyObject **cat_row,
                          unsigned char *seen)
{
    Py_ssize_t n_feat = self->n_num + self->n_cat, expect = 0;
    if (c->p >= c->end || *c->p != '{')
        return -1;
    c->p++;
    skip_ws(c);
    if (c->p < c->end && *c->p == '}') {
        c->p++;
        return 0;
    }
    for (;;) {
        const char *k;
        Py_ssize_t klen;
        skip_ws(c);
        if (scan_string(c, &k, &klen) < 0)
            return -1;
        Py_ssize_t idx;
        if (expect < n_feat && self->name_len[expect] == klen &&
            memcmp(self->name_ptr[expect], k, (size_t)klen) == 0) {
            idx = expect; /* spec order: what encode_requests writes */
        } else {
            const slot_t *s = table_get(&self->names_t, k, klen);
            if (!s)
                return -1; /* an unknown name: the Python path counts it */
            idx = (Py_ssize_t)s->value;
        }
        if (seen[idx])
            return -1; /* duplicate name */
        seen[idx] = 1;
        expect = idx + 1;
        skip_ws(c);
        if (c->p >= c->end || *c->p != ':')
            return -1;
        c->p++;
        skip_ws(c);
        if (c->p >= c->end)
            return -1;
        if (idx < self->n_num) {
            if (literal_null(c)) {
                num_row[idx] = NAN;
            } else {
                double d;
                int is_int;
                if (parse_number(c, &d, &is_int) < 0)
                    return -1;
                float f = (float)d;
                if (isinf(f))
                    return -1; /* beyond float32: non_finite, worded by the Python path */
                num_row[idx] = f;
            }
        } else {
            Py_ssize_t j = idx - self->n_num;
            PyObject *obj;
            int64_t id;
            if (literal_null(c)) {
                obj = self->empty;
                Py_INCREF(obj);
                id = self->missing_id;
            } else {
                const char *s;
                Py_ssize_t len;
                if (scan_string(c, &s, &len) < 0)
                    return -1; /* integers, booleans, escapes...: the Python path */
                const slot_t *w = (self->has_vocab && len) ? table_get(&self->vocab_t, s, len) : NULL;
                if (len == 0) {
                    obj = self->empty;
                    Py_INCREF(obj);
                    id = self->missing_id;
                } else if (w) {
                    obj = w->obj;
                    Py_INCREF(obj);
                    id = w->value;
                } else {
                    obj = PyUnicode_DecodeUTF8(s, len, NULL);
                    if (!obj) {
                        PyErr_Clear();
                        return -1; /* not UTF-8 */
                    }
                    id = self->unknown_id;
                }
            }
            Py_XSETREF(cat_row[j], obj);
            if (id_row)
                id_row[j] = id;
        }
        int more = next_member(c);
        if (more < 0)
            return -1;
        if (!more)
            return 0;
    }
}

enum { K_V = 1, K_RID = 2, K_TS = 4, K_FEAT = 8 };

/* One message into row i. Returns 0 (accepted; *rid a new reference), or -1 (reject). */
static int parse_request(Decoder *self, const char *buf, Py_ssize_t len, float *num_row,
                         int64_t *id_row, PyObject **cat_row, unsigned char *seen, int64_t *ts,
                         PyObject **rid)
{
    cur_t c = {buf, buf + len};
    int keys = 0;
    skip_ws(&c);
    if (c.p >= c.end || *c.p != '{')
        return -1;
    c.p++;
    for (;;) {
        const char *k;
        Py_ssize_t klen;
        skip_ws(&c);
        if (scan_string(&c, &k, &klen) < 0)
            return -1;
        skip_ws(&c);
        if (c.p >= c.end || *c.p != ':')
            return -1;
        c.p++;
        skip_ws(&c);
        if (klen == 1 && k[0] == 'v') {
            if (keys & K_V)
                return -1;
            keys |= K_V;
            if (c.p >= c.end || *c.p != '1')
                return -1;
            c.p++;
            if (c.p < c.end && ((*c.p >= '0' && *c.p <= '9') || *c.p == '.' || *c.p == 'e' || *c.p == 'E'))
                return -1;
        } else if (klen == 10 && memcmp(k, "request_id", 10) == 0) {
            if (keys & K_RID)
                return -1;
            keys |= K_RID;
            const char *s;
            Py_ssize_t slen;
            if (scan_string(&c, &s, &slen) < 0 || slen == 0 || slen > 4 * MAX_RID_CHARS)
                return -1;
            PyObject *str = PyUnicode_DecodeUTF8(s, slen, NULL);
            if (!str) {
                PyErr_Clear();
                return -1;
            }
            if (PyUnicode_GET_LENGTH(str) > MAX_RID_CHARS) {
                Py_DECREF(str);
                return -1;
            }
            Py_XSETREF(*rid, str);
        } else if (klen == 5 && memcmp(k, "ts_ms", 5) == 0) {
            if (keys & K_TS)
                return -1;
            keys |= K_TS;
            uint64_t t = 0;
            int digits = 0;
            if (c.p >= c.end || *c.p < '0' || *c.p > '9')
                return -1; /* negative or not a number */
            if (*c.p == '0' && c.p + 1 < c.end && c.p[1] >= '0' && c.p[1] <= '9')
                return -1;
            while (c.p < c.end && *c.p >= '0' && *c.p <= '9') {
                if (++digits > 19)
                    return -1;
                t = t * 10 + (uint64_t)(*c.p - '0');
                c.p++;
            }
            if (t > MAX_TS || (c.p < c.end && (*c.p == '.' || *c.p == 'e' || *c.p == 'E')))
                return -1;
            *ts = (int64_t)t;
        } else if (klen == 8 && memcmp(k, "features", 8) == 0) {
            if (keys & K_FEAT)
                return -1;
            keys |= K_FEAT;
            if (parse_features(self, &c, num_row, id_row, cat_row, seen) < 0)
                return -1;
        } else {
            return -1; /* "x", "fp" or anything else: the Python path */
        }
        int more = next_member(&c);
        if (more < 0)
            return -1;
        if (!more)
            break;
    }
    skip_ws(&c);
    if (c.p != c.end || keys != (K_V | K_RID | K_TS | K_FEAT))
        return -1;
    return 0;
}

static int get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t want, Py_ssize_t itemsize, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len != want * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", what, view->len, want * itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* decode(values: list, num, ids | None, ts, ok, max_bytes) -> (request_ids: list, cat: list)
 *
 * num: float32[n * n_num], ids: int64[n * n_cat] (with a vocabulary), ts: int64[n],
 * ok: uint8[n], all C-contiguous and writable. Row i of each is written for every accepted
 * message (ok[i] = 1); a rejected one's rows hold NaN / missing and its request id is None.
 * cat: a flat list of n * n_cat str ("" for missing). */
static PyObject *Decoder_decode(Decoder *self, PyObject *args)
{
    PyObject *values, *num_o, *ids_o, *ts_o, *ok_o;
    Py_ssize_t max_bytes;
    if (!PyArg_ParseTuple(args, "O!OOOOn", &PyList_Type, &values, &num_o, &ids_o, &ts_o, &ok_o, &max_bytes))
        return NULL;
    if (!self->ready) {
        PyErr_SetString(PyExc_TypeError, "Decoder not initialised");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(values), n_num = self->n_num, n_cat = self->n_cat;
    Py_ssize_t n_feat = n_num + n_cat;
    Py_buffer num_b = {0}, ids_b = {0}, ts_b = {0}, ok_b = {0};
    int have_ids = ids_o != Py_None;
    PyObject *rids = NULL, *cats = NULL, *result = NULL;
    PyObject **row = NULL;
    unsigned char *seen = NULL;
    if (have_ids && !self->has_vocab) {
        PyErr_SetString(PyExc_ValueError, "ids given to a Decoder without a vocabulary");
        return NULL;
    }
    if (get_buffer(num_o, &num_b, n * n_num, 4, "num") < 0)
        return NULL;
    if (have_ids && get_buffer(ids_o, &ids_b, n * n_cat, 8, "ids") < 0)
        goto done;
    if (get_buffer(ts_o, &ts_b, n, 8, "ts") < 0)
        goto done;
    if (get_buffer(ok_o, &ok_b, n, 1, "ok") < 0)
        goto done;
    rids = PyList_New(n);
    cats = PyList_New(n * n_cat);
    row = PyMem_Calloc((size_t)n_cat + 1, sizeof(PyObject *));
    seen = PyMem_Calloc((size_t)n_feat + 1, 1);
    if (!rids || !cats || !row || !seen) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    float *num = num_b.buf;
    int64_t *ids = have_ids ? ids_b.buf : NULL;
    int64_t *ts = ts_b.buf;
    unsigned char *ok = ok_b.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyList_GET_ITEM(values, i);
        float *num_row = num + i * n_num;
        int64_t *id_row = ids ? ids + i * n_cat : NULL;
        PyObject *rid = NULL;
        int accepted = 0;
        memset(seen, 0, (size_t)n_feat);
        for (Py_ssize_t j = 0; j < n_cat; j++)
            row[j] = NULL;
        ts[i] = 0;
        if (PyBytes_CheckExact(v) && PyBytes_GET_SIZE(v) > 0 && PyBytes_GET_SIZE(v) <= max_bytes) {
            accepted = parse_request(self, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v), num_row, id_row,
                                     row, seen, &ts[i], &rid) == 0;
        }
        if (accepted) {
            for (Py_ssize_t j = 0; j < n_feat; j++) {
                if (seen[j])
                    continue;
                if (j < n_num) {
                    num_row[j] = NAN; /* an absent name is a missing value */
                } else {
                    Py_INCREF(self->empty);
                    row[j - n_num] = self->empty;
                    if (id_row)
                        id_row[j - n_num] = self->missing_id;
                }
            }
        } else {
            Py_CLEAR(rid);
            ts[i] = 0;
            for (Py_ssize_t j = 0; j < n_num; j++)
                num_row[j] = NAN;
            for (Py_ssize_t j = 0; j < n_cat; j++) {
                Py_INCREF(self->empty);
                Py_XSETREF(row[j], self->empty);
                if (id_row)
                    id_row[j] = self->missing_id;
            }
        }
        ok[i] = (unsigned char)accepted;
        if (!rid) {
            rid = Py_None;
            Py_INCREF(rid);
        }
        PyList_SET_ITEM(rids, i, rid);
        for (Py_ssize_t j = 0; j < n_cat; j++) {
            PyList_SET_ITEM(cats, i * n_cat + j, row[j]); /* steals */
            row[j] = NULL;
        }
    }
    result = PyTuple_Pack(2, rids, cats);
done:
    Py_XDECREF(rids);
    Py_XDECREF(cats);
    PyMem_Free(row);
    PyMem_Free(seen);
    if (num_b.obj)
        PyBuffer_Release(&num_b);
    if (ids_b.obj)
        PyBuffer_Release(&ids_b);
    if (ts_b.obj)
        PyBuffer_Release(&ts_b);
    if (ok_b.obj)
        PyBuffer_Release(&ok_b);
    return result;
}

static PyMethodDef Decoder_methods[] = {
    {"decode", (PyCFunction)Decoder_decode, METH_VARARGS,
     "decode(values, num, ids, ts, ok, max_bytes) -> (request_ids, cat): fill the row of every "
     "message this parser accepts (ok[i] = 1); the caller decodes the others."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stream._fastreq.Decoder",
    .tp_basicsize = sizeof(Decoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Canonical JSON requests -> float32 numbers, vocabulary ids and categorical strings.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Decoder_init,
    .tp_dealloc = (destructor)Decoder_dealloc,
    .tp_methods = Decoder_methods,
};

/* number(text: bytes) -> float | None: the parser's double for one JSON number (None where it
 * would reject the message), so tests can check every double, not only its float32 rounding. */
static PyObject *number(PyObject *mod, PyObject *arg)
{
    (void)mod;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "number() takes bytes");
        return NULL;
    }
    cur_t c = {PyBytes_AS_STRING(arg), PyBytes_AS_STRING(arg) + PyBytes_GET_SIZE(arg)};
    double d;
    int is_int;
    if (parse_number(&c, &d, &is_int) < 0 || c.p != c.end)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(d);
}

static PyMethodDef module_methods[] = {
    {"number", number, METH_O, "number(text) -> float | None: one JSON number as the decoder reads it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "stream._fastreq",
    "Compiled decoder of canonical requests (see stream/events.py).", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastreq(void)
{
    if (PyType_Ready(&DecoderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&DecoderType);
    if (PyModule_AddObject(m, "Decoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(&DecoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
