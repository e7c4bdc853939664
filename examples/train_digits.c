/*
 * train_digits.c - the bnorm demo: trains one network twice with the same high learning rate and the
 * same initial weights, once with bnorm batch normalization and once without any normalization, and
 * shows what batch norm is for (Ioffe & Szegedy, 2015): the normalized network trains fast at a
 * learning rate at which the plain one diverges or crawls.
 *
 * Default data: the UCI handwritten digits shipped in data/digits.csv.gz (8x8 images). --fashion runs
 * on Fashion-MNIST from Debian's dataset-fashion-mnist. After training, the batch-norm network is
 * evaluated with its running statistics, its state is saved (bnorm_layer_save, safetensors) and
 * loaded into a fresh network, whose eval logits must be bitwise identical.
 *
 * Run with --help for the options; docs/demo.md explains the output.
 */
#define _POSIX_C_SOURCE 200809L
#include "bnorm/bnorm.h"
#include "demo_data.h"
#include "demo_net.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define FASHION_DIR "/usr/share/datasets/fashion-mnist"

typedef struct config {
    int fashion, epochs, batch, hidden, test_size, train_limit, threads, quiet, plot;
    unsigned long long seed;
    double lr, momentum, min_acc;
    const char *data, *out, *plot_path;
} config;

/* What one training run records per epoch for the table and the plot. */
typedef struct curve {
    double *loss, *train_acc, *test_acc, *seconds;
    int diverged_at; /* first epoch whose training hit a non-finite loss; 0 = never */
} curve;

static int quiet;
static long checks_passed, checks_failed;

/* Output of the demo itself; --check silences it (a test prints only failures). */
static void say(const char *fmt, ...) {
    if (quiet) return;
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}

static void check(int ok, const char *fmt, ...) {
    if (ok) {
        checks_passed++;
        return;
    }
    checks_failed++;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL train_digits: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: train_digits [options]\n"
            "  --fashion          Fashion-MNIST from " FASHION_DIR " (apt-get install dataset-fashion-mnist)\n"
            "  --data PATH        digits CSV (default: data/digits.csv.gz, built in) or Fashion-MNIST directory\n"
            "  --epochs N         training epochs (default 20 digits, 5 fashion)\n"
            "  --lr X             SGD learning rate, both networks (default 0.5)\n"
            "  --momentum X       SGD momentum (default 0.9)\n"
            "  --batch N          mini-batch size (default 64)\n"
            "  --hidden N         width of the hidden layers (default 128)\n"
            "  --seed N           seed of the split, the initial weights and the batch order (default 1)\n"
            "  --test-size N      digits held out for testing (default 360)\n"
            "  --train-limit N    use only the first N training images (fashion)\n"
            "  --threads N        threads for bnorm and the linear layers (default 1 digits, all fashion)\n"
            "  --out DIR          where the state is saved (default train_digits_state)\n"
            "  --plot FILE        PNG of the curves (default digits_bn_vs_nobn.png; needs gnuplot)\n"
            "  --no-plot          do not draw the plot\n"
            "  --quick            short schedule (6 epochs) without the plot\n"
            "  --min-acc X        exit non-zero unless the bnorm network's eval test accuracy is >= X (0..1)\n"
            "  --check            quiet self-test: --quick, --min-acc 0.9 unless given, and the network without\n"
            "                     normalization must end >= 30 points below; prints failures and\n"
            "                     'N passed, N failed' only\n");
}

static int parse(int argc, char **argv, config *c) {
    *c = (config){.epochs = -1, .batch = 64, .hidden = 128, .test_size = 360, .seed = 1, .lr = 0.5,
                  .momentum = 0.9, .min_acc = -1, .out = "train_digits_state", .plot = 1};
    int quick = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define TAKES_VALUE()                                                   \
    do {                                                                \
        if (!v) {                                                       \
            fprintf(stderr, "train_digits: %s needs a value\n", a);     \
            return -1;                                                  \
        }                                                               \
        i++;                                                            \
    } while (0)
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        } else if (!strcmp(a, "--fashion")) c->fashion = 1;
        else if (!strcmp(a, "--no-plot")) c->plot = 0;
        else if (!strcmp(a, "--quick")) quick = 1;
        else if (!strcmp(a, "--check")) c->quiet = quick = 1;
        else if (!strcmp(a, "--data")) { TAKES_VALUE(); c->data = v; }
        else if (!strcmp(a, "--out")) { TAKES_VALUE(); c->out = v; }
        else if (!strcmp(a, "--plot")) { TAKES_VALUE(); c->plot_path = v; }
        else if (!strcmp(a, "--epochs")) { TAKES_VALUE(); c->epochs = atoi(v); }
        else if (!strcmp(a, "--batch")) { TAKES_VALUE(); c->batch = atoi(v); }
        else if (!strcmp(a, "--hidden")) { TAKES_VALUE(); c->hidden = atoi(v); }
        else if (!strcmp(a, "--test-size")) { TAKES_VALUE(); c->test_size = atoi(v); }
        else if (!strcmp(a, "--train-limit")) { TAKES_VALUE(); c->train_limit = atoi(v); }
        else if (!strcmp(a, "--threads")) { TAKES_VALUE(); c->threads = atoi(v); }
        else if (!strcmp(a, "--seed")) { TAKES_VALUE(); c->seed = strtoull(v, NULL, 10); }
        else if (!strcmp(a, "--lr")) { TAKES_VALUE(); c->lr = atof(v); }
        else if (!strcmp(a, "--momentum")) { TAKES_VALUE(); c->momentum = atof(v); }
        else if (!strcmp(a, "--min-acc")) { TAKES_VALUE(); c->min_acc = atof(v); }
        else {
            fprintf(stderr, "train_digits: unknown option %s\n", a);
            usage(stderr);
            return -1;
        }
#undef TAKES_VALUE
    }
    if (c->epochs < 0) c->epochs = quick ? 6 : c->fashion ? 5 : 20;
    if (quick) c->plot = 0;
    if (c->quiet && c->min_acc < 0) c->min_acc = 0.9;
    if (!c->plot_path) c->plot_path = c->fashion ? "fashion_bn_vs_nobn.png" : "digits_bn_vs_nobn.png";
    if (c->epochs < 1 || c->batch < 2 || c->hidden < 1 || !(c->lr > 0) || !(c->momentum >= 0 && c->momentum < 1)) {
        fprintf(stderr, "train_digits: need --epochs >= 1, --batch >= 2, --hidden >= 1, --lr > 0, 0 <= --momentum < 1\n");
        return -1;
    }
    return 0;
}

static int load_data(const config *c, demo_dataset *train, demo_dataset *test) {
    char err[512];
    if (c->fashion) {
        const char *dir = c->data ? c->data : FASHION_DIR;
        char ip[1024], lp[1024];
        snprintf(ip, sizeof ip, "%s/train-images-idx3-ubyte.gz", dir);
        snprintf(lp, sizeof lp, "%s/train-labels-idx1-ubyte.gz", dir);
        if (demo_load_idx(ip, lp, c->train_limit, train, err, sizeof err)) goto fail;
        snprintf(ip, sizeof ip, "%s/t10k-images-idx3-ubyte.gz", dir);
        snprintf(lp, sizeof lp, "%s/t10k-labels-idx1-ubyte.gz", dir);
        if (demo_load_idx(ip, lp, 0, test, err, sizeof err)) {
            demo_dataset_free(train);
            goto fail;
        }
        if (train->dim != test->dim) {
            snprintf(err, sizeof err, "train and test images differ in size");
            demo_dataset_free(train);
            demo_dataset_free(test);
            goto fail;
        }
        if (test->classes > train->classes) train->classes = test->classes;
        test->classes = train->classes;
        return 0;
    }
    demo_dataset all;
    const char *path = c->data;
    if (demo_load_digits_csv(path, &all, err, sizeof err)) goto fail;
    int rc = demo_split(&all, c->test_size, c->seed, train, test, err, sizeof err);
    demo_dataset_free(&all);
    if (rc) goto fail;
    return 0;
fail:
    fprintf(stderr, "train_digits: %s\n", err);
    if (c->fashion && !c->data)
        fprintf(stderr, "train_digits: Fashion-MNIST comes with Debian's package: apt-get install dataset-fashion-mnist\n");
    return -1;
}

/* One epoch over train in the order perm; returns the mean loss, or NAN if a step's loss was not finite
 * (the network diverged; training stops there). */
static double train_epoch(demo_net *net, const demo_dataset *tr, const int *perm, const config *c, float *xb,
                          uint8_t *yb, double *train_acc, int64_t *steps) {
    bnorm_status st = demo_net_set_training(net, 1);
    double loss = 0;
    int correct = 0, seen = 0;
    for (int i0 = 0; i0 + 2 <= tr->n && !st; i0 += c->batch) { /* a final batch of 1 row is dropped */
        const int n = tr->n - i0 < c->batch ? tr->n - i0 : c->batch;
        for (int i = 0; i < n; i++) {
            memcpy(xb + (size_t)i * tr->dim, tr->x + (size_t)perm[i0 + i] * tr->dim, (size_t)tr->dim * sizeof(float));
            yb[i] = tr->y[perm[i0 + i]];
        }
        double l;
        int ok;
        st = demo_net_forward_backward(net, xb, yb, n, 1.0f / (float)n, &l, &ok);
        if (st) break;
        if (!isfinite(l)) return NAN;
        st = demo_net_sgd_step(net, (float)c->lr, (float)c->momentum);
        loss += l;
        correct += ok;
        seen += n;
        ++*steps;
    }
    if (st) {
        fprintf(stderr, "train_digits: training step failed: %s: %s\n", bnorm_status_string(st), bnorm_last_error());
        exit(2);
    }
    *train_acc = (double)correct / seen;
    return loss / seen;
}

static double test_accuracy(demo_net *net, const demo_dataset *te, float *logits) {
    int correct;
    bnorm_status st = demo_net_evaluate(net, te->x, te->y, te->n, &correct, NULL, logits);
    if (st) {
        fprintf(stderr, "train_digits: evaluation failed: %s: %s\n", bnorm_status_string(st), bnorm_last_error());
        exit(2);
    }
    return (double)correct / te->n;
}

static void print_cell(const curve *cv, int e) {
    if (cv->diverged_at && e + 1 >= cv->diverged_at)
        say("   diverged (loss not finite)  %5.1f%%       ", 100 * cv->test_acc[e]);
    else
        say(cv->loss[e] < 100 ? " %7.4f  %5.1f%%  %5.1f%%  %5.2fs" : " %7.1e  %5.1f%%  %5.1f%%  %5.2fs", cv->loss[e],
            100 * cv->train_acc[e], 100 * cv->test_acc[e], cv->seconds[e]);
}

/* Writes the curves and a gnuplot script into the state directory and runs gnuplot, if there is one. */
static void plot(const config *c, const curve cv[2], const char *title) {
    if (system("gnuplot --version > /dev/null 2>&1") != 0) {
        say("gnuplot not found (Debian: apt-get install gnuplot-nox): plot skipped\n");
        return;
    }
    char dat[1024], gp[1024];
    snprintf(dat, sizeof dat, "%s/curves.dat", c->out);
    snprintf(gp, sizeof gp, "%s/curves.gp", c->out);
    FILE *f = fopen(dat, "w");
    if (!f) {
        say("cannot write %s: plot skipped\n", dat);
        return;
    }
    fprintf(f, "# epoch  bn_loss  bn_test_acc  plain_loss  plain_test_acc   ('?' = diverged)\n");
    for (int e = 0; e < c->epochs; e++) {
        fprintf(f, "%d", e + 1);
        for (int k = 0; k < 2; k++) {
            if (cv[k].diverged_at && e + 1 >= cv[k].diverged_at)
                fprintf(f, " ? %.2f", 100 * cv[k].test_acc[e]);
            else
                fprintf(f, " %.6g %.2f", cv[k].loss[e], 100 * cv[k].test_acc[e]);
        }
        fprintf(f, "\n");
    }
    fclose(f);
    f = fopen(gp, "w");
    if (!f) {
        say("cannot write %s: plot skipped\n", gp);
        return;
    }
    fprintf(f,
            "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {\n"
            "  set terminal pngcairo size 1100,440 font 'sans,11'\n"
            "} else {\n"
            "  set terminal png size 1100,440\n"
            "}\n"
            "set output '%s'\n"
            "set datafile missing '?'\n"
            "set multiplot layout 1,2 title '%s: same network, same init, SGD lr %g momentum %g'\n"
            "set xlabel 'epoch'\n"
            "set grid\n"
            "set key bottom right\n"
            "set ylabel 'test accuracy (%%, eval mode)'\n"
            "set yrange [0:100]\n"
            "plot '%s' using 1:3 with linespoints lw 2 pt 7 title 'with bnorm', \\\n"
            "     '%s' using 1:5 with linespoints lw 2 pt 5 title 'without normalization'\n"
            "set key top right\n"
            "set ylabel 'training loss (cross-entropy)'\n"
            "set yrange [*:*]\n"
            "set logscale y\n"
            "plot '%s' using 1:2 with linespoints lw 2 pt 7 title 'with bnorm', \\\n"
            "     '%s' using 1:4 with linespoints lw 2 pt 5 title 'without normalization'\n"
            "unset multiplot\n",
            c->plot_path, title, c->lr, c->momentum, dat, dat, dat, dat);
    fclose(f);
    char cmd[2200];
    snprintf(cmd, sizeof cmd, "gnuplot '%s'", gp);
    if (system(cmd) == 0)
        say("plot: %s (data %s)\n", c->plot_path, dat);
    else
        say("gnuplot failed on %s: plot skipped\n", gp);
}

int main(int argc, char **argv) {
    config c;
    if (parse(argc, argv, &c)) return 2;
    quiet = c.quiet;
    /* The digits network is so small that starting threads costs more than it saves. */
    if (c.threads <= 0 && !c.fashion) c.threads = 1;
    if (c.threads > 0) {
        bnorm_set_num_threads(c.threads);
#ifdef _OPENMP
        omp_set_num_threads(c.threads);
#endif
    }
    demo_dataset tr, te;
    if (load_data(&c, &tr, &te)) return 2;
    const char *title = c.fashion ? "Fashion-MNIST" : "UCI digits";
    say("bnorm %s (%s kernels, threads: %d) - %s: %d training, %d test samples of %d features, %d classes\n",
        bnorm_version_string(), bnorm_isa_name(bnorm_get_isa()), bnorm_get_num_threads(), title, tr.n, te.n, tr.dim,
        tr.classes);
    say("network: %d -> %d (BN, ReLU) -> residual block [%d -> %d (BN, ReLU) -> %d (BN + skip + ReLU, fused)] -> %d\n",
        tr.dim, c.hidden, c.hidden, c.hidden, c.hidden, tr.classes);
    say("training both networks from the same initial weights: SGD lr %g, momentum %g, batch %d, %d epochs\n\n",
        c.lr, c.momentum, c.batch, c.epochs);

    /* nets[0] with bnorm, nets[1] the same network without normalization */
    demo_net nets[2];
    const int capacity = c.batch > 500 ? c.batch : 500; /* evaluation runs in chunks of this many rows */
    for (int k = 0; k < 2; k++) {
        bnorm_status st = demo_net_create(&nets[k], tr.dim, c.hidden, tr.classes, k == 0, capacity, c.seed * 7919 + 17);
        if (st) {
            fprintf(stderr, "train_digits: cannot build the network: %s\n", bnorm_status_string(st));
            return 2;
        }
    }
    curve cv[2];
    double *mem = (double *)calloc((size_t)8 * c.epochs, sizeof(double));
    float *xb = (float *)malloc((size_t)c.batch * tr.dim * sizeof(float));
    uint8_t *yb = (uint8_t *)malloc((size_t)c.batch);
    int *perm = (int *)malloc((size_t)tr.n * sizeof(int));
    float *logits = (float *)malloc((size_t)te.n * tr.classes * sizeof(float));
    float *logits2 = (float *)malloc((size_t)te.n * tr.classes * sizeof(float));
    if (!mem || !xb || !yb || !perm || !logits || !logits2) {
        fprintf(stderr, "train_digits: out of memory\n");
        return 2;
    }
    for (int k = 0; k < 2; k++)
        cv[k] = (curve){.loss = mem + (4 * k + 0) * c.epochs, .train_acc = mem + (4 * k + 1) * c.epochs,
                        .test_acc = mem + (4 * k + 2) * c.epochs, .seconds = mem + (4 * k + 3) * c.epochs};

    say("epoch |            with bnorm               |       without normalization\n");
    say("      |    loss   train    test    time    |    loss   train    test    time\n");
    uint64_t order_rng = c.seed ^ 0xB0B0CAFEull;
    int64_t steps[2] = {0, 0};
    for (int e = 0; e < c.epochs; e++) {
        demo_shuffle(perm, tr.n, &order_rng); /* both networks see the batches in the same order */
        for (int k = 0; k < 2; k++) {
            if (cv[k].diverged_at) { /* stopped: the curve stays where it ended */
                cv[k].test_acc[e] = cv[k].test_acc[e - 1 >= 0 ? e - 1 : 0];
                continue;
            }
            const double t0 = now();
            cv[k].loss[e] = train_epoch(&nets[k], &tr, perm, &c, xb, yb, &cv[k].train_acc[e], &steps[k]);
            cv[k].seconds[e] = now() - t0;
            if (isnan(cv[k].loss[e])) cv[k].diverged_at = e + 1;
            cv[k].test_acc[e] = test_accuracy(&nets[k], &te, NULL);
        }
        say("%5d |", e + 1);
        print_cell(&cv[0], e);
        say("   |");
        print_cell(&cv[1], e);
        say("\n");
    }
    if (c.plot) {
        mkdir(c.out, 0777); /* the curves go next to the state; a failure shows when they are written */
        plot(&c, cv, title);
    }

    /* The trained network in eval mode: the running statistics normalize. */
    const double acc = test_accuracy(&nets[0], &te, logits);
    say("\nwith bnorm, eval mode (running statistics): test accuracy %.2f%%\n", 100 * acc);
    say("without normalization:                      test accuracy %.2f%%%s\n", 100 * cv[1].test_acc[c.epochs - 1],
        cv[1].diverged_at ? " (diverged)" : "");
    if (c.min_acc >= 0)
        check(acc >= c.min_acc, "test accuracy of the bnorm network %.4f < --min-acc %.4f", acc, c.min_acc);
    if (quiet) /* the point of the demo, at its default learning rate */
        check(acc - cv[1].test_acc[c.epochs - 1] >= 0.3,
              "the network without normalization (%.4f) is not far below the bnorm network (%.4f)",
              cv[1].test_acc[c.epochs - 1], acc);
    for (int i = 0; i < 3; i++) {
        int64_t nbt = -1;
        bnorm_layer_get_num_batches_tracked(nets[0].bn[i], &nbt);
        check(nbt == steps[0], "layer %s tracked %lld batches, expected %lld training steps", demo_bn_names[i],
              (long long)nbt, (long long)steps[0]);
    }

    /* Save, load into a fresh network (other initial weights, new bnorm layers), compare. */
    char err[1024];
    bnorm_status st = demo_net_save(&nets[0], c.out, err, sizeof err);
    if (st == BNORM_STATUS_UNSUPPORTED) {
        say("state save not supported by this build (%s): reload check skipped\n", err);
        if (quiet) printf("note: %s: reload check skipped\n", err);
    } else {
        check(st == BNORM_STATUS_OK, "save: %s", err);
        demo_net fresh;
        if (!st && !(st = demo_net_create(&fresh, tr.dim, c.hidden, tr.classes, 1, capacity, c.seed * 7919 + 18))) {
            st = demo_net_load(&fresh, c.out, err, sizeof err);
            check(st == BNORM_STATUS_OK, "load: %s", err);
            if (!st) {
                const double acc2 = test_accuracy(&fresh, &te, logits2);
                const int same = !memcmp(logits, logits2, (size_t)te.n * tr.classes * sizeof(float));
                check(same && acc2 == acc, "reloaded network: accuracy %.4f vs %.4f, logits %s", acc2, acc,
                      same ? "identical" : "differ");
                for (int i = 0; i < 3; i++) {
                    int64_t a = -1, b = -2;
                    bnorm_layer_get_num_batches_tracked(nets[0].bn[i], &a);
                    bnorm_layer_get_num_batches_tracked(fresh.bn[i], &b);
                    check(a == b, "layer %s: num_batches_tracked %lld reloaded as %lld", demo_bn_names[i],
                          (long long)a, (long long)b);
                }
                say("state saved to %s/ (%s.safetensors, %s.safetensors, %s.safetensors, linear.bin) and loaded "
                    "into a fresh network: eval accuracy %.2f%%, logits %s\n",
                    c.out, demo_bn_names[0], demo_bn_names[1], demo_bn_names[2], 100 * acc2,
                    same ? "bitwise identical" : "DIFFERENT");
            }
            demo_net_destroy(&fresh);
        }
    }
    if (quiet) printf("%ld passed, %ld failed\n", checks_passed, checks_failed);
    else if (checks_failed) fprintf(stderr, "train_digits: %ld check(s) failed\n", checks_failed);

    for (int k = 0; k < 2; k++) demo_net_destroy(&nets[k]);
    demo_dataset_free(&tr);
    demo_dataset_free(&te);
    free(mem);
    free(xb);
    free(yb);
    free(perm);
    free(logits);
    free(logits2);
    return checks_failed ? 1 : 0;
}
