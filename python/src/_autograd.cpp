/*
 * _autograd.cpp - bnorm.torch's backward as a native autograd node (optional; built where libtorch's
 * C++ headers are installed, Debian's libtorch-dev and pybind11-dev).
 *
 * A torch.autograd.Function written in Python costs about 8 us a backward before its body runs (the
 * engine calls back into Python, builds ctx, checks the outputs); torch's own modules have C++ nodes.
 * This module gives bnorm the same: bnorm.torch runs the forward through bnorm._bnorm as before, then
 * attach() hangs a BnormBackward node on the output. The node keeps x and the weight as the forward
 * read them (as SavedVariables: autograd's in-place and second-backward checks apply) plus the saved
 * statistics and the ReLU mask, and its apply() calls bnorm_backward on their memory without the GIL.
 *
 * This file is C++ only because an autograd node is a C++ class; the library is reached through the
 * function pointers bnorm._bnorm exports (bnpy_capi.h), so there is one copy of libbnorm and its
 * settings. Synchronized calls (a communicator) keep the Python Function: their collective is Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <stdexcept>
#include <string>

extern "C" {
#include "bnpy_capi.h"
}

namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

const bnpy_capi *capi = nullptr;

bool dtype_of(const at::Tensor &t, bnorm_dtype *out) {
    switch (t.scalar_type()) {
    case at::kFloat: *out = BNORM_DTYPE_F32; return true;
    case at::kDouble: *out = BNORM_DTYPE_F64; return true;
    case at::kHalf: *out = BNORM_DTYPE_F16; return true;
    case at::kBFloat16: *out = BNORM_DTYPE_BF16; return true;
    default: return false;
    }
}

/* Whether t's strides are those of a dense tensor in this layout (C innermost for channels-last); dims
 * of size 1 may have any stride. The same rule as _bnorm.c's view_is_layout_impl, on the tensor the
 * forward has already accepted. */
bool is_layout(const at::Tensor &t, bnorm_layout layout) {
    const int n = (int)t.dim();
    int order[BNORM_MAX_RANK], k = 0;
    if (layout == BNORM_LAYOUT_CHANNELS_FIRST || n < 2) {
        for (int i = 0; i < n; i++) order[k++] = i;
    } else {
        order[k++] = 0;
        for (int i = 2; i < n; i++) order[k++] = i;
        order[k++] = 1;
    }
    int64_t expect = 1;
    for (int j = n - 1; j >= 0; j--) {
        const int i = order[j];
        const int64_t s = t.size(i);
        if (s > 1 && t.stride(i) != expect) return false;
        expect *= s > 1 ? s : 1;
    }
    return true;
}

struct BnormBackward : public Node {
    SavedVariable x_, weight_;   /* as the forward read them */
    at::Tensor saved_, mask_;    /* this call's own: packed statistics, ReLU mask (or undefined) */
    bnorm_desc desc_{};
    double eps_ = 0;
    bool global_ = false, has_addend_ = false;
    at::ScalarType weight_type_ = at::kFloat; /* the parameter's own dtype (the gradients are returned in it) */
    bool has_weight_ = false;

    std::string name() const override { return "BnormBackward"; }

    void release_variables() override {
        x_.reset_data();
        weight_.reset_data();
        saved_.reset();
        mask_.reset();
    }

    variable_list apply(variable_list &&grads) override {
        variable_list out(4);
        const at::Tensor &dy = grads[0];
        if (!dy.defined()) return out; /* the output did not reach the loss: no gradient */
        at::Tensor x = x_.unpack();
        at::Tensor w = weight_.unpack();
        const bool need_x = task_should_compute_output(0), need_w = task_should_compute_output(1),
                   need_b = task_should_compute_output(2), need_a = has_addend_ && task_should_compute_output(3);
        at::Tensor dyd = dy;
        if (dy.scalar_type() != x.scalar_type() || dy.strides() != x.strides()) { /* x's layout, as _like */
            at::NoGradGuard no_grad;
            dyd = at::empty_like(x);
            dyd.copy_(dy);
        }
        const at::ScalarType pdt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
        at::Tensor dx, da, dw, db;
        if (need_x) dx = at::empty_like(x);
        if (need_a) da = at::empty_like(x);
        if (w.defined()) {
            if (need_w) dw = at::empty_like(w);
            if (need_b) db = at::empty_like(w);
        } else if (need_b) {
            db = at::empty({desc_.dims[1]}, x.options().dtype(pdt).memory_format(at::MemoryFormat::Contiguous));
        }
        if (!dx.defined() && !da.defined() && !dw.defined() && !db.defined()) return out;
        const int64_t c = desc_.dims[1];
        char *sv = (char *)saved_.data_ptr();
        const size_t es = pdt == at::kDouble ? 8 : 4;
        bnorm_backward_args a{};
        a.struct_size = sizeof a;
        a.desc = desc_;
        a.x = x.data_ptr();
        a.dy = dyd.data_ptr();
        a.dx = dx.defined() ? dx.data_ptr() : nullptr;
        a.weight = w.defined() ? w.data_ptr() : nullptr;
        a.mean = sv;
        if (global_) {
            a.var = sv + (size_t)c * es;
        } else {
            a.invstd = sv + (size_t)c * es;
            a.mean_lo = sv + 2 * (size_t)c * es;
        }
        a.eps = eps_;
        a.use_global_stats = global_;
        a.relu_mask = mask_.defined() ? mask_.data_ptr() : nullptr;
        a.daddend = da.defined() ? da.data_ptr() : nullptr;
        a.dweight = dw.defined() ? dw.data_ptr() : nullptr;
        a.dbias = db.defined() ? db.data_ptr() : nullptr;
        if (capi->backward(&a) != BNORM_STATUS_OK) throw std::runtime_error(std::string("bnorm: ") + capi->last_error());
        if (has_weight_ && weight_type_ != pdt) {
            if (dw.defined()) dw = dw.to(weight_type_);
            if (db.defined()) db = db.to(weight_type_);
        }
        out[0] = dx;
        out[1] = dw;
        out[2] = db;
        out[3] = da;
        if (torch::autograd::GradMode::is_enabled() && dy.requires_grad()) {
            /* create_graph=True: these gradients are not differentiable again; say so when someone tries
             * (what torch's once_differentiable does) */
            auto err = std::make_shared<torch::autograd::DelayedError>(
                "bnorm.torch: the backward of bnorm's batch norm is not differentiable (no double backward)", 4);
            for (auto &v : out)
                if (v.defined()) {
                    v = v.detach();
                    v.set_requires_grad(true);
                }
            out = (*err)(std::move(out));
        }
        return out;
    }
};

bool tensor_arg(PyObject *o, const char *name, at::Tensor *out, bool allow_none) {
    if (o == Py_None && allow_none) {
        *out = at::Tensor();
        return true;
    }
    if (!THPVariable_Check(o)) {
        PyErr_Format(PyExc_TypeError, "bnorm._autograd.attach: %s must be a tensor%s", name,
                     allow_none ? " or None" : "");
        return false;
    }
    *out = THPVariable_Unpack(o);
    return true;
}

/* attach(y, x, weight, bias, addend, xd, wd, saved, mask, use_global_stats, eps): makes y the output of
 * a BnormBackward node whose inputs are x, weight, bias, addend (as the caller passed them: gradients
 * flow to them) and which differentiates with xd and wd (x and the weight as the forward call read
 * them), saved (the packed statistics: mean, invstd, mean_lo in training; mean, var with global
 * statistics) and mask (the ReLU mask or None). */
PyObject *attach(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11) {
        PyErr_Format(PyExc_TypeError, "bnorm._autograd.attach takes 11 arguments, got %zd", nargs);
        return nullptr;
    }
    at::Tensor y, x, w, b, a, xd, wd, sv, mask;
    if (!tensor_arg(args[0], "y", &y, false) || !tensor_arg(args[1], "x", &x, false) ||
        !tensor_arg(args[2], "weight", &w, true) || !tensor_arg(args[3], "bias", &b, true) ||
        !tensor_arg(args[4], "addend", &a, true) || !tensor_arg(args[5], "xd", &xd, false) ||
        !tensor_arg(args[6], "wd", &wd, true) || !tensor_arg(args[7], "saved", &sv, false) ||
        !tensor_arg(args[8], "mask", &mask, true))
        return nullptr;
    const int global = PyObject_IsTrue(args[9]);
    const double eps = PyFloat_AsDouble(args[10]);
    if (global < 0 || (eps == -1.0 && PyErr_Occurred())) return nullptr;
    try {
        bnorm_dtype dt;
        if (!dtype_of(xd, &dt) || xd.dim() < 2 || xd.dim() > BNORM_MAX_RANK || y.grad_fn() || !xd.is_cpu()) {
            PyErr_SetString(PyExc_ValueError, "bnorm._autograd.attach: x must be a CPU float tensor of rank 2 to 8 "
                                              "and y a fresh output");
            return nullptr;
        }
        const at::ScalarType pdt = xd.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
        const int64_t c = xd.size(1);
        if (sv.scalar_type() != pdt || !sv.is_contiguous() || sv.numel() != (global ? 2 : 3) * c ||
            (wd.defined() && (wd.scalar_type() != pdt || !wd.is_contiguous() || wd.numel() != c))) {
            PyErr_SetString(PyExc_ValueError, "bnorm._autograd.attach: saved statistics or weight of the wrong size "
                                              "or dtype");
            return nullptr;
        }
        auto node = std::shared_ptr<BnormBackward>(new BnormBackward(), torch::autograd::deleteNode);
        bnorm_desc &d = node->desc_;
        d.dtype = dt;
        d.rank = (int)xd.dim();
        for (int i = 0; i < d.rank; i++) d.dims[i] = xd.size(i);
        d.layout = is_layout(xd, BNORM_LAYOUT_CHANNELS_FIRST) || !is_layout(xd, BNORM_LAYOUT_CHANNELS_LAST)
                       ? BNORM_LAYOUT_CHANNELS_FIRST
                       : BNORM_LAYOUT_CHANNELS_LAST;
        node->x_ = SavedVariable(xd, false);
        node->weight_ = SavedVariable(wd, false);
        node->saved_ = sv;
        node->mask_ = mask;
        node->eps_ = eps;
        node->global_ = global != 0;
        node->has_addend_ = a.defined();
        node->has_weight_ = w.defined();
        if (w.defined()) node->weight_type_ = w.scalar_type();
        node->set_next_edges(torch::autograd::collect_next_edges(x, w, b, a));
        torch::autograd::set_history(y, node);
    } catch (const std::exception &e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
        return nullptr;
    }
    Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"attach", (PyCFunction)(void (*)(void))attach, METH_FASTCALL,
     "attach(y, x, weight, bias, addend, xd, wd, saved, mask, use_global_stats, eps): y becomes the output\n"
     "of a native BnormBackward node (see bnorm/torch.py)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "bnorm._autograd",
                          "bnorm.torch's backward as a native autograd node; use bnorm.torch instead.", -1, methods,
                          nullptr, nullptr, nullptr, nullptr};

} // namespace

PyMODINIT_FUNC PyInit__autograd(void) {
    capi = (const bnpy_capi *)PyCapsule_Import(BNPY_CAPI_NAME, 0);
    if (!capi) return nullptr;
    if (capi->version < BNPY_CAPI_VERSION) {
        PyErr_SetString(PyExc_ImportError, "bnorm._autograd: bnorm._bnorm is older than this module; reinstall bnorm");
        return nullptr;
    }
    return PyModule_Create(&module_def);
}
