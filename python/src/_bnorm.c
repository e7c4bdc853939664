/*
 * _bnorm.c - the CPython extension under the bnorm package: a thin layer over the public C API
 * (include/bnorm/bnorm.h). It converts arguments (numpy arrays through the buffer protocol, torch
 * tensors and other producers through DLPack's __dlpack__, both without copying), releases the GIL
 * around every compute and I/O call, and turns failures into Python exceptions carrying
 * bnorm_last_error()'s text. The classes users see are written in Python on top of it.
 *
 * Tensor rules: data tensors have rank 2..8 in logical order (N, C, d1, ...) and must be contiguous
 * channels-first (row-major) or channels-last (C innermost: torch's channels_last / channels_last_3d);
 * every other data tensor of a call must have x's shape, dtype and layout. Per-channel arrays are
 * 1-D, contiguous, of the parameter dtype (float64 for float64 data, float32 otherwise). Nothing is
 * copied, so a non-contiguous array is an error rather than a silent copy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdio.h>
#include <string.h>

#include <bnorm/bnorm.h>

#include "bnpy_capi.h"

/* --- DLPack (the v0.x ABI that torch 1.10+ and numpy 1.22+ export from __dlpack__()) ----------- */
typedef struct {
    int32_t device_type; /* 1 = CPU */
    int32_t device_id;
} dl_device;
typedef struct {
    uint8_t code; /* 0 int, 1 uint, 2 float, 4 bfloat */
    uint8_t bits;
    uint16_t lanes;
} dl_dtype;
typedef struct {
    void *data;
    dl_device device;
    int32_t ndim;
    dl_dtype dtype;
    int64_t *shape;
    int64_t *strides; /* in elements; NULL means compact row-major */
    uint64_t byte_offset;
} dl_tensor;
typedef struct dl_managed {
    dl_tensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct dl_managed *self);
} dl_managed;

/* --- argument views ------------------------------------------------------------------------- */

#define DT_OTHER (-1)
#define DT_I64 1000 /* int64 (torch's num_batches_tracked); no bnorm data type */

typedef struct {
    const char *name;   /* argument name for messages */
    PyObject *capsule;  /* DLPack capsule kept alive for the call (its destructor frees it) */
    Py_buffer buf;
    int has_buf;
    char *data;
    int ndim;
    int64_t shape[BNORM_MAX_RANK];
    int64_t strides[BNORM_MAX_RANK]; /* elements */
    int dtype;                       /* bnorm_dtype or DT_OTHER */
    int64_t itemsize;
    int readonly;
} view;

static void view_release(view *v)
{
    if (v->has_buf) {
        PyBuffer_Release(&v->buf);
        v->has_buf = 0;
    }
    Py_CLEAR(v->capsule);
}

static int64_t view_numel(const view *v)
{
    int64_t n = 1;
    for (int i = 0; i < v->ndim; i++) n *= v->shape[i];
    return n;
}

static const char *dtype_text(const view *v)
{
    if (v->dtype == DT_I64) return "int64";
    if (v->dtype >= 0) return bnorm_dtype_name((bnorm_dtype)v->dtype);
    return "an unsupported element type";
}

/* Buffer-protocol format string -> bnorm dtype. */
static int format_dtype(const char *f)
{
    if (!f) return DT_OTHER; /* plain bytes */
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (strcmp(f, "f") == 0) return BNORM_DTYPE_F32;
    if (strcmp(f, "d") == 0) return BNORM_DTYPE_F64;
    if (strcmp(f, "e") == 0) return BNORM_DTYPE_F16;
    return DT_OTHER;
}

/* Fills v from a "dltensor" capsule (reference stolen, kept in v until view_release). */
static int view_from_capsule(PyObject *cap, view *v)
{
    v->capsule = cap;
    const dl_managed *m = PyCapsule_GetPointer(cap, "dltensor");
    const dl_tensor *t = &m->dl_tensor;
    if (t->device.device_type != 1) {
        PyErr_Format(PyExc_ValueError, "bnorm: %s is not on the CPU (DLPack device type %d); bnorm computes on "
                     "CPU memory only: move it with .cpu() or keep torch's own module on that device", v->name,
                     (int)t->device.device_type);
        return -1;
    }
    if (t->ndim > BNORM_MAX_RANK || t->ndim < 0) {
        PyErr_Format(PyExc_ValueError, "bnorm: %s has rank %d; at most %d is supported", v->name, (int)t->ndim,
                     BNORM_MAX_RANK);
        return -1;
    }
    v->data = (char *)t->data + t->byte_offset;
    v->ndim = t->ndim;
    v->itemsize = (t->dtype.bits / 8) * (t->dtype.lanes ? t->dtype.lanes : 1);
    v->dtype = DT_OTHER;
    if (t->dtype.lanes == 1) {
        if (t->dtype.code == 2 && t->dtype.bits == 32) v->dtype = BNORM_DTYPE_F32;
        if (t->dtype.code == 2 && t->dtype.bits == 64) v->dtype = BNORM_DTYPE_F64;
        if (t->dtype.code == 2 && t->dtype.bits == 16) v->dtype = BNORM_DTYPE_F16;
        if (t->dtype.code == 4 && t->dtype.bits == 16) v->dtype = BNORM_DTYPE_BF16;
        if (t->dtype.code == 0 && t->dtype.bits == 64) v->dtype = DT_I64;
    }
    int64_t s = 1;
    for (int i = v->ndim - 1; i >= 0; i--) {
        v->shape[i] = t->shape[i];
        v->strides[i] = t->strides ? t->strides[i] : s;
        s *= t->shape[i];
    }
    v->readonly = 0; /* DLPack 0.x has no read-only flag; numpy refuses to export read-only arrays */
    return 0;
}

/* --- torch tensors, read through their attributes ----------------------------------------------
 * bnorm.torch registers torch.Tensor and its four dtypes once (register_torch). A tensor of that type
 * is then read through data_ptr(), shape, stride(), dtype and is_cpu: about a tenth of a microsecond
 * in all, against half a microsecond for a DLPack export, and nothing to free. The caller's reference
 * keeps the tensor (so its storage) alive for the call. */
static PyTypeObject *torch_tensor_type;
static PyObject *torch_dtypes[5]; /* float32, float64, float16, bfloat16, int64 (owned) */
static const int torch_dtype_codes[5] = {BNORM_DTYPE_F32, BNORM_DTYPE_F64, BNORM_DTYPE_F16, BNORM_DTYPE_BF16, DT_I64};
static PyObject *str_is_cpu, *str_shape, *str_stride, *str_dtype, *str_data_ptr, *str_device, *str_element_size;

static PyObject *py_register_torch(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *type, *d[5];
    if (!PyArg_ParseTuple(args, "O!OOOOO", &PyType_Type, &type, &d[0], &d[1], &d[2], &d[3], &d[4])) return NULL;
    if (!str_is_cpu) {
        str_is_cpu = PyUnicode_InternFromString("is_cpu");
        str_shape = PyUnicode_InternFromString("shape");
        str_stride = PyUnicode_InternFromString("stride");
        str_dtype = PyUnicode_InternFromString("dtype");
        str_data_ptr = PyUnicode_InternFromString("data_ptr");
        str_device = PyUnicode_InternFromString("device");
        str_element_size = PyUnicode_InternFromString("element_size");
        if (!str_is_cpu || !str_shape || !str_stride || !str_dtype || !str_data_ptr || !str_device ||
            !str_element_size)
            return NULL;
    }
    Py_XSETREF(torch_tensor_type, (PyTypeObject *)Py_NewRef(type));
    for (int i = 0; i < 5; i++) Py_XSETREF(torch_dtypes[i], Py_NewRef(d[i]));
    Py_RETURN_NONE;
}

/* Reads a tuple of ints (torch.Size or the tuple of stride()) into out[n]. */
static int int_tuple(PyObject *t, int64_t *out, int n)
{
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != n) {
        PyErr_SetString(PyExc_TypeError, "bnorm: a torch tensor's shape and strides disagree");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        long long x = PyLong_AsLongLong(PyTuple_GET_ITEM(t, i));
        if (x == -1 && PyErr_Occurred()) return -1;
        out[i] = x;
    }
    return 0;
}

static int view_from_torch(PyObject *obj, view *v)
{
    PyObject *cpu = PyObject_GetAttr(obj, str_is_cpu);
    if (!cpu) return -1;
    int on_cpu = cpu == Py_True;
    Py_DECREF(cpu);
    if (!on_cpu) {
        PyObject *dev = PyObject_GetAttr(obj, str_device);
        PyObject *ds = dev ? PyObject_Str(dev) : NULL;
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "bnorm: %s is not on the CPU (device '%s'); bnorm computes on CPU memory "
                     "only: move it with .cpu() or keep torch's own module on that device", v->name,
                     ds && PyUnicode_Check(ds) ? PyUnicode_AsUTF8(ds) : "?");
        Py_XDECREF(ds);
        Py_XDECREF(dev);
        return -1;
    }
    PyObject *shape = PyObject_GetAttr(obj, str_shape);
    if (!shape) return -1;
    if (!PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) > BNORM_MAX_RANK) {
        if (PyTuple_Check(shape))
            PyErr_Format(PyExc_ValueError, "bnorm: %s has rank %zd; at most %d is supported", v->name,
                         PyTuple_GET_SIZE(shape), BNORM_MAX_RANK);
        else
            PyErr_Format(PyExc_TypeError, "bnorm: %s: a torch tensor whose shape is not a tuple", v->name);
        Py_DECREF(shape);
        return -1;
    }
    v->ndim = (int)PyTuple_GET_SIZE(shape);
    int rc = int_tuple(shape, v->shape, v->ndim);
    Py_DECREF(shape);
    if (rc != 0) return -1;
    PyObject *strides = PyObject_CallMethodNoArgs(obj, str_stride);
    if (!strides) { /* sparse and other layouts without strides */
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "bnorm: %s must be a dense (strided) tensor", v->name);
        return -1;
    }
    rc = int_tuple(strides, v->strides, v->ndim);
    Py_DECREF(strides);
    if (rc != 0) return -1;
    PyObject *dt = PyObject_GetAttr(obj, str_dtype);
    if (!dt) return -1;
    v->dtype = DT_OTHER;
    for (int i = 0; i < 5; i++)
        if (dt == torch_dtypes[i]) v->dtype = torch_dtype_codes[i];
    Py_DECREF(dt);
    if (v->dtype == DT_I64) {
        v->itemsize = 8;
    } else if (v->dtype >= 0) {
        v->itemsize = (int64_t)bnorm_dtype_size((bnorm_dtype)v->dtype);
    } else {
        PyObject *es = PyObject_CallMethodNoArgs(obj, str_element_size);
        v->itemsize = es ? PyLong_AsLongLong(es) : 0;
        Py_XDECREF(es);
        PyErr_Clear();
    }
    PyObject *ptr = PyObject_CallMethodNoArgs(obj, str_data_ptr);
    if (!ptr) { /* sparse, quantized and other tensors without plain storage */
        PyObject *t, *val, *tb;
        PyErr_Fetch(&t, &val, &tb);
        PyObject *msg = val ? PyObject_Str(val) : NULL;
        PyErr_Format(PyExc_TypeError, "bnorm: %s must be a dense (strided) tensor: %s", v->name,
                     msg && PyUnicode_Check(msg) ? PyUnicode_AsUTF8(msg) : "its data pointer cannot be read");
        Py_XDECREF(msg);
        Py_XDECREF(t);
        Py_XDECREF(val);
        Py_XDECREF(tb);
        return -1;
    }
    v->data = PyLong_AsVoidPtr(ptr);
    Py_DECREF(ptr);
    if (!v->data && PyErr_Occurred()) return -1;
    v->readonly = 0;
    return 0;
}

/* Fills v from obj (numpy array or anything with the buffer protocol; else __dlpack__).
 * want_write: the call writes into it. Returns 0, or -1 with an exception set. */
static int view_get(PyObject *obj, const char *name, int want_write, view *v)
{
    memset(v, 0, sizeof *v);
    v->name = name;
    if (torch_tensor_type && PyObject_TypeCheck(obj, torch_tensor_type)) {
        if (view_from_torch(obj, v) != 0) goto fail;
    } else if (PyObject_CheckBuffer(obj)) {
        if (PyObject_GetBuffer(obj, &v->buf, PyBUF_RECORDS_RO) != 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "bnorm: %s: the object's buffer cannot be read with strides", name);
            return -1;
        }
        v->has_buf = 1;
        if (v->buf.ndim > BNORM_MAX_RANK) {
            PyErr_Format(PyExc_ValueError, "bnorm: %s has rank %d; at most %d is supported", name, v->buf.ndim,
                         BNORM_MAX_RANK);
            goto fail;
        }
        v->data = v->buf.buf;
        v->ndim = v->buf.ndim;
        v->readonly = v->buf.readonly;
        v->itemsize = v->buf.itemsize;
        v->dtype = format_dtype(v->buf.format);
        if (v->dtype >= 0 && (int64_t)bnorm_dtype_size((bnorm_dtype)v->dtype) != v->itemsize) v->dtype = DT_OTHER;
        for (int i = 0; i < v->ndim; i++) {
            v->shape[i] = v->buf.shape[i];
            if (v->buf.strides[i] % v->itemsize != 0) {
                PyErr_Format(PyExc_ValueError, "bnorm: %s has a stride (%zd bytes) that is not a multiple of its "
                             "element size", name, v->buf.strides[i]);
                goto fail;
            }
            v->strides[i] = v->buf.strides[i] / v->itemsize;
        }
        if (v->ndim == 0) { /* a scalar buffer */
            v->shape[0] = 1;
        }
    } else if (PyCapsule_IsValid(obj, "dltensor")) {
        /* A capsule made by the caller (bnorm.torch passes torch.utils.dlpack.to_dlpack(t): much cheaper
         * than the Python-level __dlpack__ protocol). Not consumed: its destructor frees it. */
        if (view_from_capsule(Py_NewRef(obj), v) != 0) goto fail;
    } else {
        PyObject *fn = PyObject_GetAttrString(obj, "__dlpack__");
        if (!fn) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "bnorm: %s must be a numpy array or a CPU torch tensor (an object with "
                         "the buffer protocol or __dlpack__), got %s", name, Py_TYPE(obj)->tp_name);
            return -1;
        }
        /* CUDA and other devices: refuse before exporting. */
        PyObject *dev = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
        if (dev) {
            long dt = -1;
            if (PyTuple_Check(dev) && PyTuple_GET_SIZE(dev) >= 1) dt = PyLong_AsLong(PyTuple_GET_ITEM(dev, 0));
            Py_DECREF(dev);
            if (dt == -1 && PyErr_Occurred()) PyErr_Clear();
            if (dt != 1) {
                Py_DECREF(fn);
                PyErr_Format(PyExc_ValueError, "bnorm: %s is not on the CPU (DLPack device type %ld); bnorm computes "
                             "on CPU memory only: move it with .cpu() or use torch's own module on that device",
                             name, dt);
                return -1;
            }
        } else {
            PyErr_Clear();
        }
        PyObject *cap = PyObject_CallNoArgs(fn);
        Py_DECREF(fn);
        if (!cap) {
            PyObject *t, *val, *tb;
            PyErr_Fetch(&t, &val, &tb);
            PyObject *s = val ? PyObject_Str(val) : NULL;
            PyErr_Format(PyExc_TypeError, "bnorm: %s cannot be exported through DLPack: %s", name,
                         s ? PyUnicode_AsUTF8(s) : "unknown error");
            Py_XDECREF(s);
            Py_XDECREF(t);
            Py_XDECREF(val);
            Py_XDECREF(tb);
            return -1;
        }
        if (!PyCapsule_IsValid(cap, "dltensor")) {
            Py_DECREF(cap);
            PyErr_Format(PyExc_TypeError, "bnorm: %s.__dlpack__() did not return a 'dltensor' capsule", name);
            return -1;
        }
        if (view_from_capsule(cap, v) != 0) goto fail;
    }
    if (want_write && v->readonly) {
        PyErr_Format(PyExc_ValueError, "bnorm: %s is read-only; the call writes into it", name);
        goto fail;
    }
    return 0;
fail:
    view_release(v);
    return -1;
}

/* Is v laid out contiguously in this layout? Dims of size 1 may have any stride. An empty tensor
 * (N = 0 on one rank of a synchronized group) is judged by its strides as if its size-0 dims were 1,
 * so that an empty channels-last tensor is still channels-last; strict = 0 accepts any empty one. */
static int view_is_layout_impl(const view *v, bnorm_layout layout)
{
    int order[BNORM_MAX_RANK], k = 0;
    if (layout == BNORM_LAYOUT_CHANNELS_FIRST || v->ndim < 2) {
        for (int i = 0; i < v->ndim; i++) order[k++] = i;
    } else {
        order[k++] = 0;
        for (int i = 2; i < v->ndim; i++) order[k++] = i;
        order[k++] = 1;
    }
    int64_t expect = 1;
    for (int j = v->ndim - 1; j >= 0; j--) {
        int i = order[j];
        if (v->shape[i] > 1 && v->strides[i] != expect) return 0;
        expect *= v->shape[i] > 1 ? v->shape[i] : 1;
    }
    return 1;
}

static int view_is_layout(const view *v, bnorm_layout layout)
{
    return view_is_layout_impl(v, layout) || view_numel(v) == 0;
}

/* A data tensor of a call: rank, dtype, contiguity. Sets desc from the first one (x). */
static int data_view(PyObject *obj, const char *name, int want_write, view *v, bnorm_desc *desc, int first)
{
    if (view_get(obj, name, want_write, v) != 0) return -1;
    if (first) {
        if (v->ndim < 2) {
            PyErr_Format(PyExc_ValueError, "bnorm: %s must have rank 2 to %d, (N, C, ...), got rank %d", name,
                         BNORM_MAX_RANK, v->ndim);
            goto fail;
        }
        if (v->dtype < 0 || v->dtype == DT_I64) {
            PyErr_Format(PyExc_TypeError, "bnorm: %s must be float32, float64, float16 or bfloat16, got %s "
                         "(%d-byte elements)", name, dtype_text(v), (int)v->itemsize);
            goto fail;
        }
        memset(desc, 0, sizeof *desc);
        desc->dtype = (bnorm_dtype)v->dtype;
        desc->rank = v->ndim;
        for (int i = 0; i < v->ndim; i++) desc->dims[i] = v->shape[i];
        if (view_is_layout_impl(v, BNORM_LAYOUT_CHANNELS_FIRST)) {
            desc->layout = BNORM_LAYOUT_CHANNELS_FIRST;
        } else if (view_is_layout_impl(v, BNORM_LAYOUT_CHANNELS_LAST)) {
            desc->layout = BNORM_LAYOUT_CHANNELS_LAST;
        } else if (view_numel(v) == 0) {
            desc->layout = BNORM_LAYOUT_CHANNELS_FIRST; /* empty with odd strides: nothing to read */
        } else {
            PyErr_Format(PyExc_ValueError, "bnorm: %s is not contiguous: it must be C-contiguous (channels-first) or "
                         "channels-last; copy it first (numpy.ascontiguousarray, tensor.contiguous())", name);
            goto fail;
        }
        return 0;
    }
    int same = v->ndim == desc->rank;
    for (int i = 0; same && i < v->ndim; i++) same = v->shape[i] == desc->dims[i];
    if (!same) {
        PyErr_Format(PyExc_ValueError, "bnorm: %s must have the shape of x", name);
        goto fail;
    }
    if (v->dtype != (int)desc->dtype) {
        PyErr_Format(PyExc_TypeError, "bnorm: %s must be %s like x, got %s", name, bnorm_dtype_name(desc->dtype),
                     dtype_text(v));
        goto fail;
    }
    if (!view_is_layout(v, desc->layout)) {
        PyErr_Format(PyExc_ValueError, "bnorm: %s must be contiguous in x's layout (%s)", name,
                     desc->layout == BNORM_LAYOUT_CHANNELS_LAST ? "channels-last" : "channels-first");
        goto fail;
    }
    return 0;
fail:
    view_release(v);
    return -1;
}

/* The ReLU mask: a contiguous buffer of at least bnorm_relu_mask_size bytes. obj may be None (data NULL). */
static int mask_view(PyObject *obj, int want_write, const bnorm_desc *desc, view *v)
{
    if (obj == Py_None) return 0;
    if (view_get(obj, "relu_mask", want_write, v) != 0) return -1;
    int64_t bytes = view_numel(v) * v->itemsize;
    if (!view_is_layout(v, BNORM_LAYOUT_CHANNELS_FIRST) || bytes < (int64_t)bnorm_relu_mask_size(desc)) {
        PyErr_Format(PyExc_ValueError, "bnorm: relu_mask must be a contiguous buffer of at least %zu bytes "
                     "(relu_mask_size(x))", bnorm_relu_mask_size(desc));
        return -1;
    }
    return 0;
}

/* k per-channel arrays packed in one 1-D, contiguous array of k * C values of the parameter dtype
 * (k = 1: a per-channel array; bnorm.torch's saved statistics: one allocation instead of k). obj may
 * be None (every pointer NULL); on success ptrs[i] points at the i-th block of C. */
static int packed_view(PyObject *obj, const char *name, int want_write, const bnorm_desc *desc, int k, view *v,
                       void *ptrs[])
{
    memset(v, 0, sizeof *v);
    for (int i = 0; i < k; i++) ptrs[i] = NULL;
    if (obj == NULL || obj == Py_None) return 0;
    if (view_get(obj, name, want_write, v) != 0) return -1;
    bnorm_dtype p = bnorm_param_dtype(desc->dtype);
    int64_t c = desc->dims[1];
    if (v->ndim != 1 || v->shape[0] != k * c || (v->shape[0] > 1 && v->strides[0] != 1)) {
        if (k == 1)
            PyErr_Format(PyExc_ValueError, "bnorm: %s must be a contiguous 1-D array of C = %lld values", name,
                         (long long)c);
        else
            PyErr_Format(PyExc_ValueError, "bnorm: %s must be a contiguous 1-D array of %d x C = %lld values", name,
                         k, (long long)(k * c));
        goto fail;
    }
    if (v->dtype != (int)p) {
        PyErr_Format(PyExc_TypeError, "bnorm: %s must be %s (the parameter dtype for %s data), got %s", name,
                     bnorm_dtype_name(p), bnorm_dtype_name(desc->dtype), dtype_text(v));
        goto fail;
    }
    for (int i = 0; i < k; i++) ptrs[i] = v->data + (size_t)i * (size_t)c * bnorm_dtype_size(p);
    return 0;
fail:
    view_release(v);
    return -1;
}

/* A per-channel array: 1-D, [C], contiguous, of the parameter dtype. obj may be None (data NULL). */
static int chan_view(PyObject *obj, const char *name, int want_write, const bnorm_desc *desc, view *v)
{
    void *ptr;
    return packed_view(obj, name, want_write, desc, 1, v, &ptr);
}

/* --- errors ----------------------------------------------------------------------------------- */

static PyObject *status_exception(bnorm_status s)
{
    switch (s) {
    case BNORM_STATUS_OUT_OF_MEMORY: return PyExc_MemoryError;
    case BNORM_STATUS_IO: return PyExc_OSError;
    case BNORM_STATUS_UNSUPPORTED:
    case BNORM_STATUS_COMM:
    case BNORM_STATUS_COMM_MISMATCH:
    case BNORM_STATUS_STATE: return PyExc_RuntimeError;
    default: return PyExc_ValueError;
    }
}

/* --- communicator: a Python all-gather behind bnorm_comm ---------------------------------------- */

typedef struct {
    PyObject *fn;    /* fn(send: bytes) -> buffer of size * len(send) bytes, ranks in order */
    int size;
    PyObject *exc;   /* first exception raised by fn (owned) */
} pycomm;

static int py_allgather(void *ctx, const double *send, int64_t count, double *recv, char *msg, size_t msg_cap)
{
    pycomm *c = ctx;
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = 1;
    PyObject *b = PyBytes_FromStringAndSize((const char *)send, (Py_ssize_t)(count * (int64_t)sizeof(double)));
    PyObject *r = b ? PyObject_CallOneArg(c->fn, b) : NULL;
    Py_XDECREF(b);
    if (r) {
        Py_buffer rb;
        if (PyObject_GetBuffer(r, &rb, PyBUF_C_CONTIGUOUS) == 0) {
            int64_t want = (int64_t)c->size * count * (int64_t)sizeof(double);
            if ((int64_t)rb.len == want) {
                memcpy(recv, rb.buf, (size_t)want);
                rc = 0;
            } else {
                PyErr_Format(PyExc_ValueError, "the all-gather returned %zd bytes, expected %lld (%d ranks x %lld "
                             "doubles)", rb.len, (long long)want, c->size, (long long)count);
            }
            PyBuffer_Release(&rb);
        }
        Py_DECREF(r);
    }
    if (rc != 0) {
        PyObject *t, *val, *tb;
        PyErr_Fetch(&t, &val, &tb);
        PyErr_NormalizeException(&t, &val, &tb);
        if (val && tb) PyException_SetTraceback(val, tb);
        PyObject *s = val ? PyObject_Str(val) : NULL;
        snprintf(msg, msg_cap, "Python all-gather raised %s: %s", t ? ((PyTypeObject *)t)->tp_name : "?",
                 s && PyUnicode_Check(s) ? PyUnicode_AsUTF8(s) : "");
        if (PyErr_Occurred()) PyErr_Clear();
        Py_XDECREF(s);
        if (!c->exc && val) {
            c->exc = val;
            val = NULL;
        }
        Py_XDECREF(t);
        Py_XDECREF(val);
        Py_XDECREF(tb);
    }
    PyGILState_Release(g);
    return rc;
}

/* comm argument: None or (rank, size, allgather_callable, validate). */
static int comm_parse(PyObject *obj, bnorm_comm *comm, pycomm *pc, const bnorm_comm **out)
{
    *out = NULL;
    memset(pc, 0, sizeof *pc);
    if (obj == NULL || obj == Py_None) return 0;
    int rank, size, validate;
    PyObject *fn;
    if (!PyTuple_Check(obj) || !PyArg_ParseTuple(obj, "iiOp", &rank, &size, &fn, &validate)) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "bnorm: comm must be None or (rank, size, allgather, validate)");
        return -1;
    }
    if (!PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "bnorm: comm's allgather must be callable");
        return -1;
    }
    pc->fn = fn;
    pc->size = size;
    memset(comm, 0, sizeof *comm);
    comm->rank = rank;
    comm->size = size;
    comm->validate = validate;
    comm->allgather = py_allgather;
    comm->ctx = pc;
    *out = comm;
    return 0;
}

/* Raises the exception for a failed call (the all-gather's own exception as its cause). */
static PyObject *raise_status(bnorm_status s, pycomm *pc)
{
    PyErr_SetString(status_exception(s), bnorm_last_error());
    if (pc && pc->exc) {
        PyObject *t, *val, *tb;
        PyErr_Fetch(&t, &val, &tb);
        PyErr_NormalizeException(&t, &val, &tb);
        PyException_SetCause(val, pc->exc); /* steals */
        pc->exc = NULL;
        PyErr_Restore(t, val, tb);
    }
    return NULL;
}

/* --- forward / backward ------------------------------------------------------------------------ */

#define NVIEWS 13

/* The arguments of a forward call, parsed from keywords (forward) or positions (forward_fast). */
typedef struct {
    PyObject *x, *y, *weight, *bias, *running_mean, *running_var, *save_mean, *save_invstd, *addend, *relu_mask,
        *comm, *save_mean_lo, *save;
    int training, relu;
    double momentum, eps;
    int64_t *nbt; /* num_batches_tracked, counted after a successful training call (or NULL) */
} fwd_in;

static PyObject *run_forward(const fwd_in *in)
{
    view v[NVIEWS];
    memset(v, 0, sizeof v);
    bnorm_desc d;
    bnorm_comm comm;
    pycomm pc;
    memset(&pc, 0, sizeof pc);
    const bnorm_comm *cp = NULL;
    PyObject *ret = NULL;
    if (data_view(in->x, "x", 0, &v[0], &d, 1) || data_view(in->y, "y", 1, &v[1], &d, 0)) goto done;
    if (in->addend != Py_None && data_view(in->addend, "addend", 0, &v[2], &d, 0)) goto done;
    if (chan_view(in->weight, "weight", 0, &d, &v[3]) || chan_view(in->bias, "bias", 0, &d, &v[4]) ||
        chan_view(in->running_mean, "running_mean", !!in->training, &d, &v[5]) ||
        chan_view(in->running_var, "running_var", !!in->training, &d, &v[6]) ||
        chan_view(in->save_mean, "save_mean", 1, &d, &v[7]) || chan_view(in->save_invstd, "save_invstd", 1, &d, &v[8]) ||
        chan_view(in->save_mean_lo, "save_mean_lo", 1, &d, &v[10]))
        goto done;
    void *saved[3];
    if (packed_view(in->save, "save", 1, &d, 3, &v[11], saved) != 0) goto done;
    if (in->save != Py_None) { /* forward_fast: save_mean, save_invstd and save_mean_lo are None */
        v[7].data = saved[0];
        v[8].data = saved[1];
        v[10].data = saved[2];
    }
    if (mask_view(in->relu_mask, 1, &d, &v[9]) != 0) goto done;
    if (comm_parse(in->comm, &comm, &pc, &cp) != 0) goto done;
    bnorm_forward_args a = {
        .desc = d, .x = v[0].data, .y = v[1].data, .weight = v[3].data, .bias = v[4].data, .eps = in->eps,
        .training = in->training, .running_mean = v[5].data, .running_var = v[6].data, .momentum = in->momentum,
        .save_mean = v[7].data, .save_invstd = v[8].data, .addend = v[2].data, .relu = in->relu,
        .relu_mask = v[9].data, .comm = cp, .save_mean_lo = v[10].data};
    bnorm_status s;
    Py_BEGIN_ALLOW_THREADS
    s = bnorm_forward(&a);
    Py_END_ALLOW_THREADS
    if (s != BNORM_STATUS_OK) {
        raise_status(s, &pc);
    } else {
        if (in->nbt && in->training && *in->nbt < INT64_MAX) ++*in->nbt;
        ret = Py_NewRef(Py_None);
    }
    Py_CLEAR(pc.exc);
done:
    for (int i = 0; i < NVIEWS; i++) view_release(&v[i]);
    return ret;
}

static PyObject *py_forward(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *kwlist[] = {"x", "y", "weight", "bias", "running_mean", "running_var", "save_mean",
                             "save_invstd", "addend", "relu_mask", "training", "momentum", "eps", "relu",
                             "comm", "save_mean_lo", NULL};
    fwd_in in = {.weight = Py_None, .bias = Py_None, .running_mean = Py_None, .running_var = Py_None,
                 .save_mean = Py_None, .save_invstd = Py_None, .addend = Py_None, .relu_mask = Py_None,
                 .comm = Py_None, .save_mean_lo = Py_None, .save = Py_None, .momentum = 0.1, .eps = 1e-5};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|$OOOOOOOOpddpOO", kwlist, &in.x, &in.y, &in.weight, &in.bias,
                                     &in.running_mean, &in.running_var, &in.save_mean, &in.save_invstd, &in.addend,
                                     &in.relu_mask, &in.training, &in.momentum, &in.eps, &in.relu, &in.comm,
                                     &in.save_mean_lo))
        return NULL;
    return run_forward(&in);
}

/* Positional flags and numbers of the fast entries. */
static int fast_bool(PyObject *o, int *out)
{
    int r = PyObject_IsTrue(o);
    if (r < 0) return -1;
    *out = r;
    return 0;
}

static int fast_double(PyObject *o, const char *name, double *out)
{
    double d = PyFloat_AsDouble(o);
    if (d == -1.0 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "bnorm: %s must be a number", name);
        return -1;
    }
    *out = d;
    return 0;
}

/* forward_fast(x, y, weight, bias, running_mean, running_var, save, addend, relu_mask, training, momentum,
 * eps, relu, comm, num_batches_tracked): forward with positional arguments only, for bnorm.torch's
 * per-call path (keyword parsing of sixteen names cost more than the whole small-tensor call).
 * num_batches_tracked: None, or torch's one-element int64 buffer, which a successful training call
 * counts (in place, as the module's num_batches_tracked.add_(1) would); momentum None then means
 * torch's cumulative average, 1 / (num_batches_tracked + 1). */
static PyObject *py_forward_fast(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 15) {
        PyErr_Format(PyExc_TypeError, "bnorm: forward_fast takes 15 arguments, got %zd", nargs);
        return NULL;
    }
    fwd_in in = {.x = args[0], .y = args[1], .weight = args[2], .bias = args[3], .running_mean = args[4],
                 .running_var = args[5], .save = args[6], .addend = args[7], .relu_mask = args[8],
                 .comm = args[13], .save_mean = Py_None, .save_invstd = Py_None, .save_mean_lo = Py_None};
    if (fast_bool(args[9], &in.training) || fast_double(args[11], "eps", &in.eps) || fast_bool(args[12], &in.relu))
        return NULL;
    view vn;
    memset(&vn, 0, sizeof vn);
    if (args[14] != Py_None) {
        if (view_get(args[14], "num_batches_tracked", 1, &vn) != 0) return NULL;
        if (vn.dtype != DT_I64 || view_numel(&vn) != 1) {
            PyErr_Format(PyExc_TypeError, "bnorm: num_batches_tracked must be one int64 value, got %s with %lld "
                         "elements", dtype_text(&vn), (long long)view_numel(&vn));
            view_release(&vn);
            return NULL;
        }
        in.nbt = (int64_t *)vn.data;
    }
    PyObject *ret = NULL;
    if (args[10] == Py_None) {
        in.momentum = in.nbt ? 1.0 / ((double)*in.nbt + 1.0) : 0.0;
    } else if (fast_double(args[10], "momentum", &in.momentum) != 0) {
        goto done;
    }
    ret = run_forward(&in);
done:
    view_release(&vn);
    return ret;
}

typedef struct {
    PyObject *x, *dy, *dx, *weight, *mean, *invstd, *var, *relu_mask, *daddend, *dweight, *dbias, *comm, *mean_lo,
        *saved;
    double eps;
    int global, accumulate, reduce;
} bwd_in;

static PyObject *run_backward(const bwd_in *in)
{
    view v[NVIEWS];
    memset(v, 0, sizeof v);
    bnorm_desc d;
    bnorm_comm comm;
    pycomm pc;
    memset(&pc, 0, sizeof pc);
    const bnorm_comm *cp = NULL;
    PyObject *ret = NULL;
    if (data_view(in->x, "x", 0, &v[0], &d, 1) || data_view(in->dy, "dy", 0, &v[1], &d, 0)) goto done;
    if (in->dx != Py_None && data_view(in->dx, "dx", 1, &v[2], &d, 0)) goto done;
    if (in->daddend != Py_None && data_view(in->daddend, "daddend", 1, &v[3], &d, 0)) goto done;
    if (chan_view(in->weight, "weight", 0, &d, &v[4]) || chan_view(in->mean, "mean", 0, &d, &v[5]) ||
        chan_view(in->invstd, "invstd", 0, &d, &v[6]) || chan_view(in->var, "var", 0, &d, &v[7]) ||
        chan_view(in->dweight, "dweight", 1, &d, &v[8]) || chan_view(in->dbias, "dbias", 1, &d, &v[9]) ||
        chan_view(in->mean_lo, "mean_lo", 0, &d, &v[10]))
        goto done;
    /* saved: (mean, var) with use_global_stats, else (mean, invstd, mean_lo), packed as forward's save */
    void *saved[3];
    if (packed_view(in->saved, "saved", 0, &d, in->global ? 2 : 3, &v[12], saved) != 0) goto done;
    if (in->saved != Py_None) { /* backward_fast: mean, invstd, var and mean_lo are None */
        v[5].data = saved[0];
        if (in->global) {
            v[7].data = saved[1];
        } else {
            v[6].data = saved[1];
            v[10].data = saved[2];
        }
    }
    if (mask_view(in->relu_mask, 0, &d, &v[11]) != 0 || comm_parse(in->comm, &comm, &pc, &cp) != 0) goto done;
    bnorm_backward_args a = {
        .desc = d, .x = v[0].data, .dy = v[1].data, .dx = v[2].data, .weight = v[4].data, .mean = v[5].data,
        .invstd = v[6].data, .var = v[7].data, .eps = in->eps, .use_global_stats = in->global,
        .relu_mask = v[11].data, .daddend = v[3].data, .dweight = v[8].data, .dbias = v[9].data,
        .accumulate = in->accumulate, .comm = cp, .reduce_param_grads = in->reduce, .mean_lo = v[10].data};
    bnorm_status s;
    Py_BEGIN_ALLOW_THREADS
    s = bnorm_backward(&a);
    Py_END_ALLOW_THREADS
    if (s != BNORM_STATUS_OK) {
        raise_status(s, &pc);
    } else {
        ret = Py_NewRef(Py_None);
    }
    Py_CLEAR(pc.exc);
done:
    for (int i = 0; i < NVIEWS; i++) view_release(&v[i]);
    return ret;
}

static PyObject *py_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *kwlist[] = {"x", "dy", "dx", "weight", "mean", "invstd", "var", "eps", "use_global_stats",
                             "relu_mask", "daddend", "dweight", "dbias", "accumulate", "comm",
                             "reduce_param_grads", "mean_lo", NULL};
    bwd_in in = {.dx = Py_None, .weight = Py_None, .mean = Py_None, .invstd = Py_None, .var = Py_None,
                 .relu_mask = Py_None, .daddend = Py_None, .dweight = Py_None, .dbias = Py_None, .comm = Py_None,
                 .mean_lo = Py_None, .saved = Py_None};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|$OOOOOdpOOOOpOpO", kwlist, &in.x, &in.dy, &in.dx, &in.weight,
                                     &in.mean, &in.invstd, &in.var, &in.eps, &in.global, &in.relu_mask, &in.daddend,
                                     &in.dweight, &in.dbias, &in.accumulate, &in.comm, &in.reduce, &in.mean_lo))
        return NULL;
    return run_backward(&in);
}

/* backward_fast(x, dy, dx, weight, saved, relu_mask, daddend, dweight, dbias, use_global_stats, eps, comm):
 * backward with positional arguments only (bnorm.torch), the statistics packed as forward_fast saved them. */
static PyObject *py_backward_fast(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 12) {
        PyErr_Format(PyExc_TypeError, "bnorm: backward_fast takes 12 arguments, got %zd", nargs);
        return NULL;
    }
    bwd_in in = {.x = args[0], .dy = args[1], .dx = args[2], .weight = args[3], .saved = args[4],
                 .relu_mask = args[5], .daddend = args[6], .dweight = args[7], .dbias = args[8], .comm = args[11],
                 .mean = Py_None, .invstd = Py_None, .var = Py_None, .mean_lo = Py_None};
    if (fast_bool(args[9], &in.global) || fast_double(args[10], "eps", &in.eps)) return NULL;
    return run_backward(&in);
}

static PyObject *py_relu_mask_size(PyObject *self, PyObject *ox)
{
    (void)self;
    view v;
    bnorm_desc d;
    if (data_view(ox, "x", 0, &v, &d, 1) != 0) return NULL;
    view_release(&v);
    return PyLong_FromSize_t(bnorm_relu_mask_size(&d));
}

/* "channels_first" / "channels_last" for a data tensor (what bnorm will treat it as). */
static PyObject *py_layout(PyObject *self, PyObject *ox)
{
    (void)self;
    view v;
    bnorm_desc d;
    if (data_view(ox, "x", 0, &v, &d, 1) != 0) return NULL;
    view_release(&v);
    return PyUnicode_FromString(d.layout == BNORM_LAYOUT_CHANNELS_LAST ? "channels_last" : "channels_first");
}

/* Whether bnorm reads t in place: contiguous channels-first or channels-last (any rank, any dtype). */
static PyObject *py_is_dense(PyObject *self, PyObject *ot)
{
    (void)self;
    view v;
    if (view_get(ot, "x", 0, &v) != 0) return NULL;
    int dense = view_is_layout(&v, BNORM_LAYOUT_CHANNELS_FIRST) || view_is_layout(&v, BNORM_LAYOUT_CHANNELS_LAST);
    view_release(&v);
    return PyBool_FromLong(dense);
}

/* --- state files through a temporary layer ----------------------------------------------------- */

static const char *mode_names[] = {"new_weight", "kept_weight", "cumulative"};

static int options_from_dict(PyObject *dict, bnorm_layer_options *o)
{
    if (!PyDict_Check(dict)) {
        PyErr_SetString(PyExc_TypeError, "bnorm: options must be a dict");
        return -1;
    }
    memset(o, 0, sizeof *o);
    PyObject *it;
#define GETITEM(key)                                                                                   \
    if (!(it = PyDict_GetItemString(dict, key))) {                                                     \
        PyErr_Format(PyExc_KeyError, "bnorm: options lack '%s'", key);                                 \
        return -1;                                                                                     \
    }
    GETITEM("num_features") o->num_features = PyLong_AsLongLong(it);
    GETITEM("float64") o->param_dtype = PyObject_IsTrue(it) ? BNORM_DTYPE_F64 : BNORM_DTYPE_F32;
    GETITEM("eps") o->eps = PyFloat_AsDouble(it);
    GETITEM("momentum") o->momentum = PyFloat_AsDouble(it);
    GETITEM("momentum_mode") {
        const char *m = PyUnicode_AsUTF8(it);
        if (!m) return -1;
        int found = 0;
        for (int i = 0; i < 3; i++)
            if (strcmp(m, mode_names[i]) == 0) {
                o->momentum_mode = (bnorm_momentum_mode)i;
                found = 1;
            }
        if (!found) {
            PyErr_Format(PyExc_ValueError, "bnorm: unknown momentum_mode '%s'", m);
            return -1;
        }
    }
    GETITEM("affine") o->affine = PyObject_IsTrue(it);
    GETITEM("track_running_stats") o->track_running_stats = PyObject_IsTrue(it);
    GETITEM("freeze") o->freeze = PyObject_IsTrue(it);
    GETITEM("fused_relu") o->fused_relu = PyObject_IsTrue(it);
#undef GETITEM
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *options_to_dict(const bnorm_layer_options *o)
{
    return Py_BuildValue("{s:L,s:O,s:d,s:d,s:s,s:O,s:O,s:O,s:O}", "num_features", (long long)o->num_features,
                         "float64", o->param_dtype == BNORM_DTYPE_F64 ? Py_True : Py_False, "eps", o->eps,
                         "momentum", o->momentum, "momentum_mode", mode_names[o->momentum_mode], "affine",
                         o->affine ? Py_True : Py_False, "track_running_stats",
                         o->track_running_stats ? Py_True : Py_False, "freeze", o->freeze ? Py_True : Py_False,
                         "fused_relu", o->fused_relu ? Py_True : Py_False);
}

static const bnorm_tensor_id state_ids[4] = {BNORM_TENSOR_WEIGHT, BNORM_TENSOR_BIAS, BNORM_TENSOR_RUNNING_MEAN,
                                             BNORM_TENSOR_RUNNING_VAR};

/* Views of the four state arrays (None where the layer has none) checked against the options. */
static int state_views(PyObject *arrays[4], const bnorm_layer_options *o, int want_write, view v[4])
{
    bnorm_desc d = {.dtype = o->param_dtype, .layout = BNORM_LAYOUT_CHANNELS_FIRST, .rank = 2,
                    .dims = {1, o->num_features}};
    static const char *names[4] = {"weight", "bias", "running_mean", "running_var"};
    for (int i = 0; i < 4; i++) {
        int needed = i < 2 ? o->affine : o->track_running_stats;
        if (needed && arrays[i] == Py_None) {
            PyErr_Format(PyExc_ValueError, "bnorm: %s is required by these options", names[i]);
            goto fail;
        }
        if (chan_view(needed ? arrays[i] : Py_None, names[i], want_write, &d, &v[i]) != 0) goto fail;
    }
    return 0;
fail:
    for (int i = 0; i < 4; i++) view_release(&v[i]);
    return -1;
}

/* save_state(path, prefix, options, weight, bias, running_mean, running_var, num_batches_tracked);
 * load_state(path, prefix, options, weight, bias, running_mean, running_var) -> (options, nbt). */
static PyObject *save_or_load(PyObject *args, int load)
{
    PyObject *opath, *od, *arrays[4];
    const char *prefix;
    long long nbt = 0;
    if (!PyArg_ParseTuple(args, load ? "O&sOOOOO" : "O&sOOOOOL", PyUnicode_FSConverter, &opath, &prefix, &od,
                          &arrays[0], &arrays[1], &arrays[2], &arrays[3], &nbt))
        return NULL;
    const char *path = PyBytes_AS_STRING(opath);
    PyObject *ret = NULL;
    bnorm_layer *l = NULL;
    bnorm_layer_options o;
    view v[4];
    memset(v, 0, sizeof v);
    if (options_from_dict(od, &o) != 0 || state_views(arrays, &o, load, v) != 0) goto done;
    bnorm_status s = bnorm_layer_create(&o, &l);
    if (s != BNORM_STATUS_OK) {
        raise_status(s, NULL);
        goto done;
    }
    size_t bytes = (size_t)o.num_features * bnorm_dtype_size(o.param_dtype);
    if (!load) {
        for (int i = 0; i < 4; i++) {
            void *p;
            if (v[i].data && bnorm_layer_tensor(l, state_ids[i], &p) == BNORM_STATUS_OK) memcpy(p, v[i].data, bytes);
        }
        if (o.track_running_stats && (s = bnorm_layer_set_num_batches_tracked(l, nbt)) != BNORM_STATUS_OK) {
            raise_status(s, NULL);
            goto done;
        }
        Py_BEGIN_ALLOW_THREADS
        s = bnorm_layer_save(l, path, prefix);
        Py_END_ALLOW_THREADS
        if (s != BNORM_STATUS_OK) {
            raise_status(s, NULL);
            goto done;
        }
        ret = Py_NewRef(Py_None);
    } else {
        Py_BEGIN_ALLOW_THREADS
        s = bnorm_layer_load(l, path, prefix);
        Py_END_ALLOW_THREADS
        if (s != BNORM_STATUS_OK) {
            raise_status(s, NULL);
            goto done;
        }
        int64_t n = 0;
        bnorm_layer_options lo;
        bnorm_layer_get_options(l, &lo);
        if (o.track_running_stats) bnorm_layer_get_num_batches_tracked(l, &n);
        PyObject *dict = options_to_dict(&lo);
        if (!dict) goto done;
        for (int i = 0; i < 4; i++) {
            void *p;
            if (v[i].data && bnorm_layer_tensor(l, state_ids[i], &p) == BNORM_STATUS_OK) memcpy(v[i].data, p, bytes);
        }
        ret = Py_BuildValue("(NL)", dict, (long long)n);
    }
done:
    bnorm_layer_destroy(l);
    for (int i = 0; i < 4; i++) view_release(&v[i]);
    Py_DECREF(opath);
    return ret;
}

static PyObject *py_save(PyObject *self, PyObject *args)
{
    (void)self;
    return save_or_load(args, 0);
}

static PyObject *py_load(PyObject *self, PyObject *args)
{
    (void)self;
    return save_or_load(args, 1);
}

/* --- threads, ISA, version --------------------------------------------------------------------- */

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg)
{
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    bnorm_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromLong(bnorm_get_num_threads());
}

static PyObject *py_get_isa(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyUnicode_FromString(bnorm_isa_name(bnorm_get_isa()));
}

static PyObject *py_set_isa(PyObject *self, PyObject *arg)
{
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    for (int i = BNORM_ISA_SCALAR; i <= BNORM_ISA_AVX512; i++) {
        if (strcmp(name, bnorm_isa_name((bnorm_isa)i)) == 0) {
            bnorm_status s = bnorm_set_isa((bnorm_isa)i);
            if (s != BNORM_STATUS_OK) return raise_status(s, NULL);
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_ValueError, "bnorm: unknown instruction set '%s' (scalar, avx2, avx512)", name);
    return NULL;
}

static PyMethodDef methods[] = {
    {"forward", (PyCFunction)(void (*)(void))py_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(x, y, *, weight=None, bias=None, running_mean=None, running_var=None, save_mean=None,\n"
     "        save_invstd=None, addend=None, relu_mask=None, training=False, momentum=0.1, eps=1e-5,\n"
     "        relu=False, comm=None)\nbnorm_forward on arrays/tensors (no copies; GIL released)."},
    {"backward", (PyCFunction)(void (*)(void))py_backward, METH_VARARGS | METH_KEYWORDS,
     "backward(x, dy, *, dx=None, weight=None, mean=None, invstd=None, var=None, eps=0.0,\n"
     "         use_global_stats=False, relu_mask=None, daddend=None, dweight=None, dbias=None,\n"
     "         accumulate=False, comm=None, reduce_param_grads=False)\nbnorm_backward."},
    {"register_torch", py_register_torch, METH_VARARGS,
     "register_torch(Tensor, float32, float64, float16, bfloat16, int64): read torch tensors through their\n"
     "attributes."},
    {"is_dense", py_is_dense, METH_O, "Whether bnorm reads the tensor in place (channels-first or -last)."},
    {"forward_fast", (PyCFunction)(void (*)(void))py_forward_fast, METH_FASTCALL,
     "forward_fast(x, y, weight, bias, running_mean, running_var, save, addend, relu_mask, training,\n"
     "             momentum, eps, relu, comm, num_batches_tracked): forward, positional (save: mean, invstd,\n"
     "             mean_lo packed; momentum None: 1 / (num_batches_tracked + 1); a training call counts\n"
     "             num_batches_tracked)."},
    {"backward_fast", (PyCFunction)(void (*)(void))py_backward_fast, METH_FASTCALL,
     "backward_fast(x, dy, dx, weight, saved, relu_mask, daddend, dweight, dbias, use_global_stats, eps,\n"
     "              comm): backward, positional (saved as forward_fast's save, or mean, var)."},
    {"relu_mask_size", py_relu_mask_size, METH_O, "Bytes of the ReLU mask for a data tensor like x."},
    {"layout", py_layout, METH_O, "'channels_first' or 'channels_last': how bnorm reads x."},
    {"save_state", py_save, METH_VARARGS,
     "save_state(path, prefix, options, weight, bias, running_mean, running_var, num_batches_tracked)"},
    {"load_state", py_load, METH_VARARGS,
     "load_state(path, prefix, options, weight, bias, running_mean, running_var) -> (options, nbt);\n"
     "fills the given arrays only when the whole load succeeded."},
    {"set_num_threads", py_set_num_threads, METH_O, "bnorm_set_num_threads(n); n <= 0: default."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "bnorm_get_num_threads()."},
    {"get_isa", py_get_isa, METH_NOARGS, "The kernel variant in use: 'scalar', 'avx2' or 'avx512'."},
    {"set_isa", py_set_isa, METH_O, "Caps the kernel variant (tests, benchmarks)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "bnorm._bnorm",
                                    "Thin C layer over bnorm.h; use the bnorm package instead.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__bnorm(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    static const bnpy_capi capi = {BNPY_CAPI_VERSION, bnorm_backward, bnorm_last_error};
    PyObject *cap = PyCapsule_New((void *)&capi, BNPY_CAPI_NAME, NULL);
    if (PyModule_AddStringConstant(m, "version", bnorm_version_string()) != 0 || !cap ||
        PyModule_AddObject(m, "_C_API", cap) != 0) {
        Py_XDECREF(cap);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
