/*
 * demo_net.h - the network of the training examples: a multilayer perceptron with batch norm from
 * bnorm and one residual block that ends in bnorm's fused BN + add + ReLU.
 *
 *   h1     = ReLU(BN1(fc1(x)))                     in -> hidden
 *   h2     = ReLU(BN2(fc2(h1)))                    hidden -> hidden
 *   h3     = ReLU(BN3(fc3(h2)) + h1)               hidden -> hidden, one fused bnorm call
 *   logits = fc4(h3)                               hidden -> classes, softmax cross-entropy
 *
 * With use_bn = 0 the same network is built without normalization: every BN is the identity, the
 * last step of the block a plain add + ReLU. The linear layers are plain C loops (OpenMP over rows
 * when the library is built with OpenMP); their order of summation is fixed, so runs repeat bitwise
 * for a given thread count.
 *
 * Training is split so that a data-parallel driver can step in between: demo_net_forward_backward
 * computes the gradients of one batch, demo_net_sgd_step applies them.
 */
#ifndef BNORM_DEMO_NET_H
#define BNORM_DEMO_NET_H

#include "bnorm/bnorm.h"

#include <stdint.h>

typedef struct demo_linear {
    int in, out;
    float *w;        /* [in][out]: row k holds the weights from input k, so y += x[k] * w[k] */
    float *b;        /* [out] */
    float *gw, *gb;  /* gradients, same shapes (overwritten by each backward) */
    float *vw, *vb;  /* SGD momentum buffers */
} demo_linear;

typedef struct demo_net {
    int use_bn, in, hidden, classes, capacity;
    demo_linear fc[4];
    bnorm_layer *bn[3];  /* NULL without batch norm; bn[2] is the fused one */
    float *vbn[3][2];    /* momentum buffers of the BN weight and bias */
    /* activations of the last forward (capacity rows each) and backward scratch */
    float *z1, *h1, *z2, *h2, *z3, *h3, *logits;
    float *d_a, *d_b, *d_skip;
} demo_net;

/* The bnorm layer names used in state files (PyTorch-style prefixes), index as net.bn. */
extern const char *const demo_bn_names[3];

/* Builds the network for batches of up to capacity rows. Linear weights: He-normal from seed, biases 0;
 * BN layers: PyTorch defaults (eps 1e-5, momentum 0.1). Returns a bnorm status (OUT_OF_MEMORY, ...). */
bnorm_status demo_net_create(demo_net *net, int in, int hidden, int classes, int use_bn, int capacity,
                             uint64_t seed);
void demo_net_destroy(demo_net *net);

/* Switches every BN layer between training (batch statistics) and eval (running statistics). */
bnorm_status demo_net_set_training(demo_net *net, int training);

/* Forward of n <= capacity rows; *logits points into the network ([n][classes], valid until the next
 * forward). n = 0 is allowed for a rank whose slice of a distributed batch is empty: synchronized BN
 * layers still take part in their collectives (unsynchronized ones write nothing). */
bnorm_status demo_net_forward(demo_net *net, const float *x, int n, const float **logits);

/* Forward and backward of one batch with softmax cross-entropy. The loss gradient is scaled by
 * grad_scale (1/n for the batch mean; 1/global_n when the batch is one slice of a distributed batch).
 * Every gradient is overwritten (with zeros when n = 0). *loss_sum receives the summed (unscaled) loss
 * of the n rows and *correct the number of rows whose arg-max logit is the label. */
bnorm_status demo_net_forward_backward(demo_net *net, const float *x, const uint8_t *y, int n, float grad_scale,
                                       double *loss_sum, int *correct);

/* SGD with momentum (PyTorch's form: v = mu * v + g; p -= lr * v) on every parameter. */
bnorm_status demo_net_sgd_step(demo_net *net, float lr, float momentum);

/* Accuracy (and, if loss_sum is not NULL, summed loss) over n rows in eval mode; the rows are run in
 * batches of capacity. If logits_out is not NULL it receives all [n][classes] logits. The network is
 * left in eval mode. */
bnorm_status demo_net_evaluate(demo_net *net, const float *x, const uint8_t *y, int n, int *correct,
                               double *loss_sum, float *logits_out);

/* Saves the whole state into directory dir (created if needed): each BN layer with bnorm_layer_save
 * (dir/<name>.safetensors, tensors prefixed "<name>."), the linear layers in dir/linear.bin (see
 * demo_net.c for its layout). Returns the first failing status; err receives a message. */
bnorm_status demo_net_save(const demo_net *net, const char *dir, char *err, size_t err_cap);
/* Loads what demo_net_save wrote into a network of the same shape. */
bnorm_status demo_net_load(demo_net *net, const char *dir, char *err, size_t err_cap);

#endif
