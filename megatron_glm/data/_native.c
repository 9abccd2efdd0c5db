/* Compiled helpers of the preprocessor; each has a pure-Python twin, used when this module was
 * not built, and the tests check the two agree.
 *
 * flatten_ids(ids, out, lo, hi) -> int
 *   Copy the token ids of `ids` (a list of lists of int, as SentencePiece's batch encode
 *   returns them) in order into `out`, a writable C-contiguous buffer of 2-byte unsigned or
 *   4-byte signed integers (its itemsize tells which), checking lo <= id <= hi. Returns the
 *   number of ids written. numpy's fromiter over itertools.chain does the same at ~50 ns per
 *   id, a sizeable share of the preprocessing CPU; this loop is a few ns per id.
 *
 *   Errors: TypeError for a non-list row or a non-int id, OverflowError for an id outside
 *   [lo, hi] (the same exception type numpy raises), ValueError if `out` is too small or has
 *   an unsupported itemsize. Nothing is written past the end of `out`.
 *
 * row_lengths(ids, lengths) -> int
 *   lengths[i] = len(ids[i]) (an int64 buffer of len(ids)); returns the sum: the size of the
 *   buffer flatten_ids then needs.
 *
 * starting_with(texts, prefixes) -> list[int]
 *   Indices of the texts that start with one of `prefixes` (a tuple of non-empty str): the
 *   first character is compared before any prefix is, so a text costs far less than a
 *   str.startswith call per text from Python (docs/benchmarks.md).
 *
 * split_sentences(texts, counts) -> list[str]
 *   The sentences of every text of the list `texts`, in order, by the rules of
 *   megatron_glm/data/sentence_split.py (its module docstring; the vectorised numpy twin is
 *   there): pieces that concatenate back to the text, each sentence beginning with the
 *   whitespace before it; counts[i] (an int64 buffer of len(texts)) receives the number of
 *   sentences of texts[i]. One pass per text, one substring per sentence: several times
 *   cheaper than the numpy version (bench_preprocess --stages; docs/benchmarks.md).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static int check_row(PyObject *row, Py_ssize_t index) {
    if (!PyList_Check(row)) {
        PyErr_Format(PyExc_TypeError, "ids[%zd] is %.100s, not a list", index,
                     Py_TYPE(row)->tp_name);
        return -1;
    }
    return 0;
}

/* texts[index], a borrowed reference, or NULL with TypeError if it is not a str. */
static PyObject *text_at(PyObject *texts, Py_ssize_t index) {
    PyObject *text = PyList_GET_ITEM(texts, index);
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "texts[%zd] is %.100s, not a str", index,
                     Py_TYPE(text)->tp_name);
        return NULL;
    }
    return text;
}

static int read_id(PyObject *item, long long lo, long long hi, long long *value) {
    if (!PyLong_Check(item)) {
        PyErr_Format(PyExc_TypeError, "token id %R is not an int", item);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow || v < lo || v > hi) {
        PyErr_Format(PyExc_OverflowError, "token id %R is outside [%lld, %lld]", item, lo, hi);
        return -1;
    }
    *value = v;
    return 0;
}

static PyObject *flatten_ids(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *ids;
    Py_buffer out;
    long long lo, hi;
    if (!PyArg_ParseTuple(args, "O!w*LL", &PyList_Type, &ids, &out, &lo, &hi)) {
        return NULL;
    }
    Py_ssize_t capacity = out.itemsize > 0 ? out.len / out.itemsize : 0;
    if (out.itemsize != 2 && out.itemsize != 4) {
        PyErr_Format(PyExc_ValueError, "out has itemsize %zd; 2 (uint16) or 4 (int32) expected",
                     out.itemsize);
        PyBuffer_Release(&out);
        return NULL;
    }
    Py_ssize_t written = 0;
    Py_ssize_t rows = PyList_GET_SIZE(ids);
    for (Py_ssize_t i = 0; i < rows; i++) {
        PyObject *row = PyList_GET_ITEM(ids, i);
        if (check_row(row, i) < 0) {
            goto fail;
        }
        Py_ssize_t n = PyList_GET_SIZE(row);
        if (n > capacity - written) {
            PyErr_Format(PyExc_ValueError, "out holds %zd ids; ids[%zd] needs more", capacity, i);
            goto fail;
        }
        for (Py_ssize_t j = 0; j < n; j++) {
            long long v;
            if (read_id(PyList_GET_ITEM(row, j), lo, hi, &v) < 0) {
                goto fail;
            }
            if (out.itemsize == 2) {
                ((uint16_t *)out.buf)[written++] = (uint16_t)v;
            } else {
                ((int32_t *)out.buf)[written++] = (int32_t)v;
            }
        }
    }
    PyBuffer_Release(&out);
    return PyLong_FromSsize_t(written);
fail:
    PyBuffer_Release(&out);
    return NULL;
}

static PyObject *row_lengths(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *ids;
    Py_buffer lengths;
    if (!PyArg_ParseTuple(args, "O!w*", &PyList_Type, &ids, &lengths)) {
        return NULL;
    }
    Py_ssize_t rows = PyList_GET_SIZE(ids), total = 0;
    if (lengths.itemsize != 8 || lengths.len != rows * 8) {
        PyErr_Format(PyExc_ValueError, "lengths must be int64 [%zd]", rows);
        PyBuffer_Release(&lengths);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < rows; i++) {
        PyObject *row = PyList_GET_ITEM(ids, i);
        if (check_row(row, i) < 0) {
            PyBuffer_Release(&lengths);
            return NULL;
        }
        ((int64_t *)lengths.buf)[i] = PyList_GET_SIZE(row);
        total += PyList_GET_SIZE(row);
    }
    PyBuffer_Release(&lengths);
    return PyLong_FromSsize_t(total);
}

/* ---- prefix scan ------------------------------------------------------------------------ */

/* 1 if `text` starts with one of the str `prefixes`, 0 if not, -1 on error. */
static int starts_with_any(PyObject *text, PyObject *prefixes) {
    if (PyUnicode_GET_LENGTH(text) == 0) {
        return 0;
    }
    Py_UCS4 first = PyUnicode_READ_CHAR(text, 0);
    for (Py_ssize_t p = 0; p < PyTuple_GET_SIZE(prefixes); p++) {
        PyObject *prefix = PyTuple_GET_ITEM(prefixes, p);
        if (PyUnicode_READ_CHAR(prefix, 0) == first) {
            Py_ssize_t match = PyUnicode_Tailmatch(text, prefix, 0, PY_SSIZE_T_MAX, -1);
            if (match != 0) {
                return match < 0 ? -1 : 1;
            }
        }
    }
    return 0;
}

static PyObject *starting_with(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *texts, *prefixes;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &texts, &PyTuple_Type, &prefixes)) {
        return NULL;
    }
    for (Py_ssize_t p = 0; p < PyTuple_GET_SIZE(prefixes); p++) {
        PyObject *prefix = PyTuple_GET_ITEM(prefixes, p);
        if (!PyUnicode_Check(prefix) || PyUnicode_GET_LENGTH(prefix) == 0) {
            PyErr_Format(PyExc_ValueError, "prefixes[%zd] is not a non-empty str", p);
            return NULL;
        }
    }
    PyObject *found = PyList_New(0);
    for (Py_ssize_t t = 0; found != NULL && t < PyList_GET_SIZE(texts); t++) {
        PyObject *text = text_at(texts, t);
        int hit = text == NULL ? -1 : starts_with_any(text, prefixes);
        PyObject *index = hit == 1 ? PyLong_FromSsize_t(t) : NULL;
        if (hit < 0 || (hit == 1 && (index == NULL || PyList_Append(found, index) < 0))) {
            Py_CLEAR(found);
        }
        Py_XDECREF(index);
    }
    return found;
}

/* ---- sentence splitting ---------------------------------------------------------------- */

enum { BREAK = 1, ASCII_TERM = 2, CJK_TERM = 4, CLOSER = 8 };

/* Class bits of the ASCII characters (filled by the module init from the strings below). */
static unsigned char ascii_class[128];

static void init_ascii_class(void) {
    static const char breaks[] = "\n\r\v\f\x1c\x1d\x1e", terms[] = ".?!;:", closers[] = "\"')]}";
    for (const char *p = breaks; *p; p++) ascii_class[(unsigned char)*p] |= BREAK;
    for (const char *p = terms; *p; p++) ascii_class[(unsigned char)*p] |= ASCII_TERM;
    for (const char *p = closers; *p; p++) ascii_class[(unsigned char)*p] |= CLOSER;
}

/* The class bits of any character: a table for ASCII, a switch for the few others. */
static inline int char_class(Py_UCS4 c) {
    if (c < 128) {
        return ascii_class[c];
    }
    switch (c) {
    case 0x85: case 0x2028: case 0x2029:
        return BREAK;
    case 0x3002: case 0xFF1F: case 0xFF01: case 0xFF1B: case 0xFF1A:  /* 。？！；： */
        return CJK_TERM;
    case 0x2019: case 0x201D: case 0x00BB: case 0x300D: case 0x300F: case 0xFF09: case 0x3011:
    case 0x300B:  /* ’ ” » 」 』 ） 】 》 */
        return CLOSER;
    default:
        return 0;
    }
}

/* The sentences of one text as they are found: `start` is where the next one to append begins,
 * `pending` where the content of the last one found ends (-1: none yet). */
typedef struct {
    PyObject *text, *out;
    Py_ssize_t start, pending, count;
} Sentences;

static int append_sentence(Sentences *s, Py_ssize_t end) {
    PyObject *sentence = PyUnicode_Substring(s->text, s->start, end);
    if (sentence == NULL) {
        return -1;
    }
    int rc = PyList_Append(s->out, sentence);
    Py_DECREF(sentence);
    s->count++;
    return rc;
}

/* A segment text[start:end] between two boundaries was cut off: if it holds a non-whitespace
 * character, a sentence's content ends after the last one, and the sentence found before it is
 * complete: appended, from its start up to its own content end (the whitespace after that begins
 * the new sentence). Returns 0, or -1 on error. */
static int found_segment(Sentences *s, int kind, const void *data, Py_ssize_t start,
                         Py_ssize_t end) {
    while (end > start && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, end - 1))) {
        end--;
    }
    if (end == start) {
        return 0;
    }
    if (s->pending >= 0) {
        if (append_sentence(s, s->pending) < 0) {
            return -1;
        }
        s->start = s->pending;
    }
    s->pending = end;
    return 0;
}

/* Where the piece starting with the terminator at i ends (exclusive), and whether it ends a
 * sentence: a run of terminators of one kind, then closers; a CJK run always, an ASCII run only
 * before whitespace or the end (else just its terminators are taken, as ordinary characters). */
static Py_ssize_t terminator_run(int kind, const void *data, Py_ssize_t i, Py_ssize_t n,
                                 int *ends_sentence) {
    int term = char_class(PyUnicode_READ(kind, data, i)) & (ASCII_TERM | CJK_TERM);
    Py_ssize_t j = i;
    while (j < n && (char_class(PyUnicode_READ(kind, data, j)) & term)) {
        j++;
    }
    Py_ssize_t k = j;
    while (k < n && (char_class(PyUnicode_READ(kind, data, k)) & CLOSER)) {
        k++;
    }
    if (term == CJK_TERM || k == n || Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, k))) {
        *ends_sentence = 1;
        return k;
    }
    *ends_sentence = 0;
    return j;
}

/* Sentences of one text appended to `out`; returns how many, or -1 on error. */
static Py_ssize_t split_text(PyObject *text, PyObject *out) {
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), segment = 0, i = 0;
    Sentences s = {text, out, 0, -1, 0};
    while (i < n) {
        int cls = char_class(PyUnicode_READ(kind, data, i));
        if (!(cls & (BREAK | ASCII_TERM | CJK_TERM))) {
            i++;
            continue;
        }
        int cut = 1;
        Py_ssize_t end = i, next = i + 1;
        if (!(cls & BREAK)) {
            end = next = terminator_run(kind, data, i, n, &cut);
        }
        if (cut) {
            if (found_segment(&s, kind, data, segment, end) < 0) {
                return -1;
            }
            segment = next;
        }
        i = next;
    }
    if (found_segment(&s, kind, data, segment, n) < 0) {
        return -1;
    }
    if (s.pending >= 0 && append_sentence(&s, n) < 0) {  /* the last one ends with the text */
        return -1;
    }
    return s.count;
}

static PyObject *split_sentences(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *texts;
    Py_buffer counts;
    if (!PyArg_ParseTuple(args, "O!w*", &PyList_Type, &texts, &counts)) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(texts);
    if (counts.itemsize != 8 || counts.len != n * 8) {
        PyErr_Format(PyExc_ValueError, "counts must be int64 [%zd]", n);
        PyBuffer_Release(&counts);
        return NULL;
    }
    PyObject *out = PyList_New(0);
    for (Py_ssize_t t = 0; out != NULL && t < n; t++) {
        PyObject *text = text_at(texts, t);
        Py_ssize_t found = text == NULL ? -1 : split_text(text, out);
        if (found < 0) {
            Py_CLEAR(out);
            break;
        }
        ((int64_t *)counts.buf)[t] = found;
    }
    PyBuffer_Release(&counts);
    return out;
}

static PyMethodDef methods[] = {
    {"flatten_ids", flatten_ids, METH_VARARGS,
     "flatten_ids(ids, out, lo, hi) -> int: copy list-of-lists token ids into a uint16/int32 "
     "buffer, range-checked."},
    {"row_lengths", row_lengths, METH_VARARGS,
     "row_lengths(ids, lengths) -> int: lengths of the rows of a list of lists, and their sum."},
    {"starting_with", starting_with, METH_VARARGS,
     "starting_with(texts, prefixes) -> list[int]: indices of the texts with one of prefixes."},
    {"split_sentences", split_sentences, METH_VARARGS,
     "split_sentences(texts, counts) -> list[str]: the rule-based sentence splitter."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "Compiled helpers of the preprocessor.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    init_ascii_class();
    return PyModule_Create(&module);
}
