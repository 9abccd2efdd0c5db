/* Compiled helpers of megatron_glm.data.preprocess (pure-Python fallbacks live there).
 *
 * flatten_ids(ids, out, lo, hi) -> int
 *   Copy the token ids of `ids` (a list of lists of int, as SentencePiece's batch encode
 *   returns them) in order into `out`, a writable C-contiguous buffer of 2-byte unsigned or
 *   4-byte signed integers (its itemsize tells which), checking lo <= id <= hi. Returns the
 *   number of ids written. numpy's fromiter over itertools.chain does the same at ~50 ns per
 *   id, a sizeable share of the preprocessing CPU; this loop is a few ns per id.
 *
 * Errors: TypeError for a non-list row or a non-int id, OverflowError for an id outside
 * [lo, hi] (the same exception type numpy raises), ValueError if `out` is too small or has an
 * unsupported itemsize. Nothing is written past the end of `out`.
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

static PyMethodDef methods[] = {
    {"flatten_ids", flatten_ids, METH_VARARGS,
     "flatten_ids(ids, out, lo, hi) -> int: copy list-of-lists token ids into a uint16/int32 "
     "buffer, range-checked."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "Compiled helpers of megatron_glm.data.preprocess.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
