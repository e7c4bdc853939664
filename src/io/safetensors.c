/*
 * safetensors.c - a layer's state as a safetensors file under PyTorch state_dict names.
 *
 * Reading treats the file as hostile: the header is bounded, checked as UTF-8, parsed by cJSON, and
 * every entry of the whole file (not only the tensors we want) is validated against the data area
 * before anything is copied; the layer is written only after all of its tensors have been read and
 * converted into scratch arrays. Writing builds the whole file in memory, then goes through a temporary
 * file in the destination's directory (write, flush, fsync, close, rename, fsync of the directory) so
 * the destination is replaced whole or not at all. See docs/state.md for the format and its rules.
 */
#define _POSIX_C_SOURCE 200809L

#include "../layer/layer_internal.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <locale.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define ST_MAX_HEADER 100000000ull       /* the safetensors reference implementation's limit */
#define ST_MAX_EXACT 9007199254740992.0  /* 2^53: JSON numbers above it are not exact doubles */
#define ST_NAME_FMT "%.200s"             /* names in messages are cut, they may be hostile */

/* ---------------------------------------------------------------------------------------------
 * Test hook (not public API): called before every I/O step of a save with a step number counting
 * from 1; a nonzero return makes that step fail as if the system call had failed with EIO. A failing
 * write first writes half of its bytes, as a full disk would.
 * ------------------------------------------------------------------------------------------- */
int (*bn_safetensors_fail_hook)(int step, const char *what) = NULL;

static int st_inject(int *step, const char *what) {
    ++*step;
    if (bn_safetensors_fail_hook && bn_safetensors_fail_hook(*step, what)) {
        errno = EIO;
        return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * dtypes of the format
 * ------------------------------------------------------------------------------------------- */
enum { ST_F16 = 0, ST_BF16, ST_F32, ST_F64, ST_I64, ST_OTHER };

static const struct {
    const char *name;
    unsigned size;
    int kind;
} st_dtypes[] = {
    {"F16", 2, ST_F16},       {"BF16", 2, ST_BF16},    {"F32", 4, ST_F32},     {"F64", 8, ST_F64},
    {"I64", 8, ST_I64},       {"BOOL", 1, ST_OTHER},   {"U8", 1, ST_OTHER},    {"I8", 1, ST_OTHER},
    {"F8_E5M2", 1, ST_OTHER}, {"F8_E4M3", 1, ST_OTHER}, {"F8_E8M0", 1, ST_OTHER}, {"I16", 2, ST_OTHER},
    {"U16", 2, ST_OTHER},     {"I32", 4, ST_OTHER},    {"U32", 4, ST_OTHER},   {"U64", 8, ST_OTHER},
    {"C64", 8, ST_OTHER},
};
#define ST_NDTYPES (sizeof st_dtypes / sizeof st_dtypes[0])

/* ---------------------------------------------------------------------------------------------
 * A parsed, validated file
 * ------------------------------------------------------------------------------------------- */
typedef struct st_entry {
    const char *name;
    int dtype; /* index into st_dtypes */
    const cJSON *shape;
    int rank;
    uint64_t numel, begin, end; /* offsets relative to the data area */
    size_t order;               /* position in the header */
} st_entry;

typedef struct st_file {
    const char *F;     /* the public function, for messages */
    const char *label; /* the path, for messages */
    FILE *fp;          /* the source: a file ... */
    const unsigned char *mem; /* ... or bytes in memory (fuzzing) */
    uint64_t size;
    uint64_t data_off, data_size;
    cJSON *root;
    const cJSON *meta;
    st_entry *ent; /* sorted by name */
    size_t n;
} st_file;

static void st_close(st_file *f) {
    if (f->fp) fclose(f->fp);
    cJSON_Delete(f->root);
    free(f->ent);
    f->fp = NULL;
    f->root = NULL;
    f->ent = NULL;
}

static int st_read(st_file *f, uint64_t off, void *buf, size_t n) {
    if (off > f->size || n > f->size - off) return -1;
    if (f->mem) {
        memcpy(buf, f->mem + off, n);
        return 0;
    }
    if (fseeko(f->fp, (off_t)off, SEEK_SET) != 0) return -1;
    return fread(buf, 1, n, f->fp) == n ? 0 : -1;
}

static uint64_t st_le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* Length of the valid UTF-8 sequence at s (s[0] >= 0x80, n bytes left), 0 if invalid. */
static size_t st_utf8_seq(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t len;
    uint32_t cp, min;
    if ((c & 0xe0) == 0xc0) { len = 2; cp = c & 0x1f; min = 0x80; }
    else if ((c & 0xf0) == 0xe0) { len = 3; cp = c & 0x0f; min = 0x800; }
    else if ((c & 0xf8) == 0xf0) { len = 4; cp = c & 0x07; min = 0x10000; }
    else return 0;
    if (n < len) return 0;
    for (size_t k = 1; k < len; k++) {
        if ((s[k] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[k] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return len;
}

/* The header must be UTF-8 without NUL or raw control characters, and no string may hold the
 * escape \u0000: cJSON would cut a name there, so two readers could see different names. */
static const char *st_check_text(const unsigned char *s, size_t n, size_t *where) {
    int in_string = 0;
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        *where = i;
        if (c < 0x80) {
            if (c < 0x20 && (in_string || (c != '\t' && c != '\n' && c != '\r')))
                return "a control character or NUL (JSON allows them only escaped, in strings)";
            if (in_string && c == '\\') {
                if (i + 1 < n && s[i + 1] == 'u' && i + 5 < n && s[i + 2] == '0' && s[i + 3] == '0' &&
                    s[i + 4] == '0' && s[i + 5] == '0')
                    return "the escape \\u0000";
                i += 2;
                continue;
            }
            if (c == '"') in_string = !in_string;
            i++;
            continue;
        }
        size_t len = st_utf8_seq(s + i, n - i);
        if (!len) return "invalid UTF-8";
        i += len;
    }
    return NULL;
}

/* A JSON number that is an exact integer in [0, 2^53]. */
static int st_uint(const cJSON *v, uint64_t *out) {
    if (!cJSON_IsNumber(v)) return 0;
    double d = v->valuedouble;
    if (!(d >= 0 && d <= ST_MAX_EXACT) || d != floor(d)) return 0;
    *out = (uint64_t)d;
    return 1;
}

/* The one member named key; 0 if absent, -1 if it appears twice. */
static int st_member(const cJSON *obj, const char *key, const cJSON **out) {
    int found = 0;
    *out = NULL;
    for (const cJSON *c = obj->child; c; c = c->next)
        if (c->string && strcmp(c->string, key) == 0) {
            if (found) return -1;
            found = 1;
            *out = c;
        }
    return found;
}

static int st_cmp_name(const void *a, const void *b) {
    return strcmp(((const st_entry *)a)->name, ((const st_entry *)b)->name);
}
static int st_cmp_offset(const void *a, const void *b) {
    const st_entry *x = (const st_entry *)a, *y = (const st_entry *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->order < y->order ? -1 : (x->order > y->order);
}
static int st_cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static bnorm_status st_fmt(st_file *f, const char *fmt_rule, const char *name) {
    if (name) return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: tensor \"" ST_NAME_FMT "\": %s", f->label, name, fmt_rule);
    return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: %s", f->label, fmt_rule);
}

static bnorm_status st_check_metadata(st_file *f, const cJSON *m) {
    if (!cJSON_IsObject(m)) return st_fmt(f, "__metadata__ is not an object of strings", NULL);
    size_t k = 0;
    for (const cJSON *c = m->child; c; c = c->next) {
        if (!cJSON_IsString(c) || !c->string)
            return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: __metadata__ entry \"" ST_NAME_FMT "\" is not a string",
                           f->label, c->string ? c->string : "");
        k++;
    }
    if (k < 2) return BNORM_STATUS_OK;
    const char **keys = (const char **)malloc(k * sizeof *keys);
    if (!keys) return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, f->F, "%s: cannot allocate %zu metadata keys", f->label, k);
    k = 0;
    for (const cJSON *c = m->child; c; c = c->next) keys[k++] = c->string;
    qsort(keys, k, sizeof *keys, st_cmp_str);
    for (size_t i = 1; i < k; i++)
        if (strcmp(keys[i - 1], keys[i]) == 0) {
            bnorm_status st = bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: __metadata__ key \"" ST_NAME_FMT "\" appears twice",
                                      f->label, keys[i]);
            free(keys);
            return st;
        }
    free(keys);
    return BNORM_STATUS_OK;
}

/* Validates one tensor entry of the header. */
static bnorm_status st_check_entry(st_file *f, const cJSON *c, st_entry *e) {
    const char *name = c->string;
    e->name = name;
    if (!cJSON_IsObject(c)) return st_fmt(f, "the entry is not an object", name);
    const cJSON *dt, *shape, *offs;
    int r;
    if ((r = st_member(c, "dtype", &dt)) != 1)
        return st_fmt(f, r ? "\"dtype\" appears twice" : "no \"dtype\"", name);
    if ((r = st_member(c, "shape", &shape)) != 1)
        return st_fmt(f, r ? "\"shape\" appears twice" : "no \"shape\"", name);
    if ((r = st_member(c, "data_offsets", &offs)) != 1)
        return st_fmt(f, r ? "\"data_offsets\" appears twice" : "no \"data_offsets\"", name);
    if (!cJSON_IsString(dt)) return st_fmt(f, "\"dtype\" is not a string", name);
    e->dtype = -1;
    for (size_t i = 0; i < ST_NDTYPES; i++)
        if (strcmp(dt->valuestring, st_dtypes[i].name) == 0) e->dtype = (int)i;
    if (e->dtype < 0)
        return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: tensor \"" ST_NAME_FMT "\": unknown dtype \"%.40s\"", f->label,
                       name, dt->valuestring);
    if (!cJSON_IsArray(shape)) return st_fmt(f, "\"shape\" is not an array", name);
    int zero = 0, rank = 0;
    for (const cJSON *d = shape->child; d; d = d->next, rank++) {
        uint64_t v;
        if (!st_uint(d, &v)) return st_fmt(f, "a \"shape\" entry is not an integer in [0, 2^53]", name);
        zero |= v == 0;
    }
    uint64_t numel = zero ? 0 : 1;
    if (!zero)
        for (const cJSON *d = shape->child; d; d = d->next) {
            uint64_t v = (uint64_t)d->valuedouble;
            if (numel > UINT64_MAX / v) return st_fmt(f, "the element count of \"shape\" overflows 64 bits", name);
            numel *= v;
        }
    e->shape = shape;
    e->rank = rank;
    e->numel = numel;
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 || !st_uint(offs->child, &e->begin) ||
        !st_uint(offs->child->next, &e->end))
        return st_fmt(f, "\"data_offsets\" is not an array of two integers in [0, 2^53]", name);
    if (e->begin > e->end)
        return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: tensor \"" ST_NAME_FMT "\": data_offsets [%llu, %llu]: begin > end",
                       f->label, name, (unsigned long long)e->begin, (unsigned long long)e->end);
    if (e->end > f->data_size)
        return bn_fail(BNORM_STATUS_FORMAT, f->F,
                       "%s: tensor \"" ST_NAME_FMT "\": data_offsets [%llu, %llu] end beyond the data area of %llu bytes",
                       f->label, name, (unsigned long long)e->begin, (unsigned long long)e->end,
                       (unsigned long long)f->data_size);
    uint64_t es = st_dtypes[e->dtype].size;
    if (numel > UINT64_MAX / es || numel * es != e->end - e->begin)
        return bn_fail(BNORM_STATUS_FORMAT, f->F,
                       "%s: tensor \"" ST_NAME_FMT "\": data_offsets [%llu, %llu] span %llu bytes but shape x %s size "
                       "needs %llu elements x %u bytes",
                       f->label, name, (unsigned long long)e->begin, (unsigned long long)e->end,
                       (unsigned long long)(e->end - e->begin), st_dtypes[e->dtype].name, (unsigned long long)numel,
                       (unsigned)es);
    return BNORM_STATUS_OK;
}

/* Reads and validates the whole header. Exactly one of path / mem is given. */
static bnorm_status st_open(st_file *f, const char *F, const char *path, const unsigned char *mem, size_t mem_size) {
    memset(f, 0, sizeof *f);
    f->F = F;
    f->label = path ? path : "<memory>";
    if (path) {
        f->fp = fopen(path, "rb");
        if (!f->fp) return bn_fail(BNORM_STATUS_IO, F, "%s: cannot open: %s", path, strerror(errno));
        struct stat sb;
        if (fstat(fileno(f->fp), &sb) != 0 || !S_ISREG(sb.st_mode)) {
            st_close(f);
            return bn_fail(BNORM_STATUS_IO, F, "%s: not a regular file", path);
        }
        f->size = (uint64_t)sb.st_size;
    } else {
        f->mem = mem;
        f->size = mem_size;
    }
    unsigned char len8[8];
    if (f->size < 8)
        return st_fmt(f, "shorter than the 8-byte header length: not a safetensors file", NULL);
    if (st_read(f, 0, len8, 8) != 0) return bn_fail(BNORM_STATUS_IO, F, "%s: cannot read the header length", f->label);
    uint64_t n = st_le64(len8);
    if (n < 2 || n > ST_MAX_HEADER || n > f->size - 8)
        return bn_fail(BNORM_STATUS_FORMAT, F,
                       "%s: header length %llu: must be in [2, %llu] and fit in the file of %llu bytes", f->label,
                       (unsigned long long)n, ST_MAX_HEADER, (unsigned long long)f->size);
    f->data_off = 8 + n;
    f->data_size = f->size - f->data_off;
    char *hdr = (char *)malloc((size_t)n);
    if (!hdr) return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "%s: cannot allocate a header of %llu bytes", f->label,
                             (unsigned long long)n);
    if (st_read(f, 8, hdr, (size_t)n) != 0) {
        free(hdr);
        return bn_fail(BNORM_STATUS_IO, F, "%s: cannot read the header", f->label);
    }
    size_t where = 0;
    const char *bad = st_check_text((const unsigned char *)hdr, (size_t)n, &where);
    if (bad) {
        free(hdr);
        return bn_fail(BNORM_STATUS_FORMAT, F, "%s: header byte %zu: %s", f->label, where, bad);
    }
    if (hdr[0] != '{') {
        free(hdr);
        return st_fmt(f, "the header does not start with '{'", NULL);
    }
    const char *end = NULL;
    f->root = cJSON_ParseWithLengthOpts(hdr, (size_t)n, &end, 0);
    if (!f->root) {
        size_t pos = end && end >= hdr && end <= hdr + n ? (size_t)(end - hdr) : 0;
        free(hdr);
        return bn_fail(BNORM_STATUS_FORMAT, F, "%s: the header is not valid JSON (error near byte %zu)", f->label, pos);
    }
    for (const char *p = end; p < hdr + n; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            size_t pos = (size_t)(p - hdr);
            free(hdr);
            return bn_fail(BNORM_STATUS_FORMAT, F, "%s: header byte %zu: text after the JSON object", f->label, pos);
        }
    free(hdr);
    if (!cJSON_IsObject(f->root)) return st_fmt(f, "the header is not a JSON object", NULL);

    size_t count = 0;
    for (const cJSON *c = f->root->child; c; c = c->next) count++;
    f->ent = (st_entry *)calloc(count ? count : 1, sizeof *f->ent);
    if (!f->ent) return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "%s: cannot allocate %zu entries", f->label, count);
    size_t order = 0;
    bnorm_status st;
    for (const cJSON *c = f->root->child; c; c = c->next, order++) {
        if (!c->string) return st_fmt(f, "an entry has no name", NULL);
        if (strcmp(c->string, "__metadata__") == 0) {
            if (f->meta) return st_fmt(f, "__metadata__ appears twice", NULL);
            if ((st = st_check_metadata(f, c))) return st;
            f->meta = c;
            continue;
        }
        st_entry *e = &f->ent[f->n];
        e->order = order;
        if ((st = st_check_entry(f, c, e))) return st;
        f->n++;
    }
    /* the tensors must tile the data area: no overlap, no hole, nothing after the last one */
    qsort(f->ent, f->n, sizeof *f->ent, st_cmp_offset);
    uint64_t at = 0;
    for (size_t i = 0; i < f->n; i++) {
        const st_entry *e = &f->ent[i];
        if (e->begin < at)
            return bn_fail(BNORM_STATUS_FORMAT, F,
                           "%s: tensor \"" ST_NAME_FMT "\": data_offsets [%llu, %llu] overlap tensor \"" ST_NAME_FMT "\"",
                           f->label, e->name, (unsigned long long)e->begin, (unsigned long long)e->end,
                           f->ent[i - 1].name);
        if (e->begin > at)
            return bn_fail(BNORM_STATUS_FORMAT, F,
                           "%s: tensor \"" ST_NAME_FMT "\": data_offsets begin at %llu but the data before ends at %llu: "
                           "the format allows no holes",
                           f->label, e->name, (unsigned long long)e->begin, (unsigned long long)at);
        at = e->end;
    }
    if (at != f->data_size)
        return bn_fail(BNORM_STATUS_FORMAT, F,
                       "%s: the tensors cover %llu bytes of a data area of %llu: the format allows no trailing bytes",
                       f->label, (unsigned long long)at, (unsigned long long)f->data_size);
    qsort(f->ent, f->n, sizeof *f->ent, st_cmp_name);
    for (size_t i = 1; i < f->n; i++)
        if (strcmp(f->ent[i - 1].name, f->ent[i].name) == 0)
            return st_fmt(f, "the name appears twice", f->ent[i].name);
    return BNORM_STATUS_OK;
}

/* prefix + name in a new allocation (NULL when out of memory). */
static char *st_join(const char *a, const char *b, const char *c) {
    size_t la = strlen(a), lb = strlen(b), lc = strlen(c);
    char *s = (char *)malloc(la + lb + lc + 1);
    if (!s) return NULL;
    memcpy(s, a, la);
    memcpy(s + la, b, lb);
    memcpy(s + la + lb, c, lc + 1);
    return s;
}

static const st_entry *st_find(const st_file *f, const char *name) {
    st_entry key;
    key.name = name;
    return f->n ? (const st_entry *)bsearch(&key, f->ent, f->n, sizeof key, st_cmp_name) : NULL;
}

static const char *st_meta_get(const st_file *f, const char *key) {
    const cJSON *v;
    if (!f->meta || st_member(f->meta, key, &v) != 1) return NULL;
    return v->valuestring;
}

/* ---------------------------------------------------------------------------------------------
 * One BN layer inside a file
 * ------------------------------------------------------------------------------------------- */
enum { T_WEIGHT, T_BIAS, T_MEAN, T_VAR, T_NBT, T_COUNT };
static const char *const st_names[T_COUNT] = {"weight", "bias", "running_mean", "running_var",
                                              "num_batches_tracked"};

/* Metadata keys, each stored as "bnorm." + prefix + key. */
enum { M_VERSION, M_NUM_FEATURES, M_PARAM_DTYPE, M_EPS, M_MOMENTUM, M_MOMENTUM_MODE, M_AFFINE, M_TRACK, M_FREEZE,
       M_FUSED, M_COUNT };
static const char *const st_meta_keys[M_COUNT] = {"version", "num_features", "param_dtype", "eps", "momentum",
                                                  "momentum_mode", "affine", "track_running_stats", "freeze",
                                                  "fused_relu"};
static const char *const st_modes[3] = {"new_weight", "kept_weight", "cumulative"};

typedef struct st_layer {
    const st_entry *t[T_COUNT];
    int64_t C;             /* 0 if no per-channel tensor */
    int affine, track;     /* from the tensors */
    int f64;               /* some per-channel tensor is stored as F64 */
    int has_options;
    bnorm_layer_options opt; /* from the metadata when has_options */
} st_layer;

/* Formats a double so that strtod gives it back exactly, with '.' whatever the locale. */
static void st_fmt_double(char *buf, size_t cap, double v) {
    snprintf(buf, cap, "%.17g", v);
    const char *dp = localeconv()->decimal_point;
    if (dp && dp[0] && strcmp(dp, ".") != 0) {
        char *p = strstr(buf, dp);
        if (p) {
            size_t l = strlen(dp);
            *p = '.';
            memmove(p + 1, p + l, strlen(p + l) + 1);
        }
    }
}

static int st_parse_double(const char *s, double *out) {
    char tmp[128];
    const char *dp = localeconv()->decimal_point;
    size_t n = strlen(s);
    if (n == 0 || n >= 64) return 0;
    if (dp && dp[0] && strcmp(dp, ".") != 0) { /* translate '.' to the locale's point for strtod */
        size_t o = 0, l = strlen(dp);
        for (size_t i = 0; i < n && o + l < sizeof tmp; i++) {
            if (s[i] == '.') { memcpy(tmp + o, dp, l); o += l; }
            else tmp[o++] = s[i];
        }
        tmp[o] = '\0';
    } else {
        memcpy(tmp, s, n + 1);
    }
    char *end;
    errno = 0;
    double v = strtod(tmp, &end);
    if (end == tmp || *end != '\0') return 0;
    *out = v;
    return 1;
}

static int st_parse_int(const char *s, int64_t lo, int64_t hi, int64_t *out) {
    if (!*s || (*s != '-' && (*s < '0' || *s > '9'))) return 0;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (*end != '\0' || errno || v < lo || v > hi) return 0;
    *out = v;
    return 1;
}

/* Reads the bnorm options stored for prefix, if any: all keys or none. */
static bnorm_status st_layer_options(st_file *f, const char *prefix, st_layer *L) {
    const char *val[M_COUNT];
    int present = 0;
    for (int k = 0; k < M_COUNT; k++) {
        char *key = st_join("bnorm.", prefix, st_meta_keys[k]);
        if (!key) return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, f->F, "cannot allocate a metadata key");
        val[k] = st_meta_get(f, key);
        free(key);
        present += val[k] != NULL;
    }
    L->has_options = 0;
    if (!present) return BNORM_STATUS_OK;
    for (int k = 0; k < M_COUNT; k++)
        if (!val[k])
            return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: __metadata__ has bnorm options for prefix \"" ST_NAME_FMT
                           "\" but no \"bnorm." ST_NAME_FMT "%s\"", f->label, prefix, prefix, st_meta_keys[k]);
    int64_t iv;
#define ST_BAD_META(k)                                                                                          \
    bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: __metadata__ \"bnorm." ST_NAME_FMT "%s\" = \"%.40s\": %s", f->label, \
            prefix, st_meta_keys[k], val[k], st_meta_rule[k])
    static const char *const st_meta_rule[M_COUNT] = {
        "this bnorm reads version 1", "must be an integer >= 1", "must be float32 or float64",
        "must be a number", "must be a number", "must be new_weight, kept_weight or cumulative",
        "must be 0 or 1", "must be 0 or 1", "must be 0 or 1", "must be 0 or 1"};
    bnorm_layer_options o;
    memset(&o, 0, sizeof o);
    if (strcmp(val[M_VERSION], "1") != 0) return ST_BAD_META(M_VERSION);
    if (!st_parse_int(val[M_NUM_FEATURES], 1, INT64_MAX, &iv)) return ST_BAD_META(M_NUM_FEATURES);
    o.num_features = iv;
    if (strcmp(val[M_PARAM_DTYPE], "float32") == 0) o.param_dtype = BNORM_DTYPE_F32;
    else if (strcmp(val[M_PARAM_DTYPE], "float64") == 0) o.param_dtype = BNORM_DTYPE_F64;
    else return ST_BAD_META(M_PARAM_DTYPE);
    if (!st_parse_double(val[M_EPS], &o.eps)) return ST_BAD_META(M_EPS);
    if (!st_parse_double(val[M_MOMENTUM], &o.momentum)) return ST_BAD_META(M_MOMENTUM);
    int mode = -1;
    for (int i = 0; i < 3; i++)
        if (strcmp(val[M_MOMENTUM_MODE], st_modes[i]) == 0) mode = i;
    if (mode < 0) return ST_BAD_META(M_MOMENTUM_MODE);
    o.momentum_mode = (bnorm_momentum_mode)mode;
    int *flags[4] = {&o.affine, &o.track_running_stats, &o.freeze, &o.fused_relu};
    for (int k = M_AFFINE; k <= M_FUSED; k++) {
        if (!st_parse_int(val[k], 0, 1, &iv)) return ST_BAD_META(k);
        *flags[k - M_AFFINE] = (int)iv;
    }
#undef ST_BAD_META
    if (bn_layer_check_options(f->F, &o) != BNORM_STATUS_OK) {
        char why[512];
        snprintf(why, sizeof why, "%s", bnorm_last_error());
        return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: the bnorm options stored for prefix \"" ST_NAME_FMT "\" are invalid (%s)",
                       f->label, prefix, why);
    }
    L->has_options = 1;
    L->opt = o;
    return BNORM_STATUS_OK;
}

/* C of a per-channel tensor: shape (C), or MegEngine's (1, C, 1, ...); 0 if neither. */
static int64_t st_channels(const st_entry *e) {
    if (e->rank == 1) return (int64_t)e->shape->child->valuedouble;
    if (e->rank < 2) return 0;
    int i = 0;
    int64_t C = 0;
    for (const cJSON *d = e->shape->child; d; d = d->next, i++) {
        if (i == 1) C = (int64_t)d->valuedouble;
        else if (d->valuedouble != 1) return 0;
    }
    return C;
}

/* Finds and checks the tensors of the layer under prefix (structure only, no layer involved). */
static bnorm_status st_layer_find(st_file *f, const char *prefix, st_layer *L) {
    memset(L, 0, sizeof *L);
    const st_entry *first = NULL; /* the tensor that fixed C */
    for (int t = 0; t < T_COUNT; t++) {
        char *name = st_join(prefix, st_names[t], "");
        if (!name) return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, f->F, "cannot allocate a tensor name");
        L->t[t] = st_find(f, name);
        free(name);
    }
    for (int t = T_WEIGHT; t <= T_VAR; t++) {
        const st_entry *e = L->t[t];
        if (!e) continue;
        int kind = st_dtypes[e->dtype].kind;
        if (kind != ST_F16 && kind != ST_BF16 && kind != ST_F32 && kind != ST_F64)
            return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: tensor \"" ST_NAME_FMT "\": dtype %s: must be F16, BF16, F32 or F64",
                           f->label, e->name, st_dtypes[e->dtype].name);
        L->f64 |= kind == ST_F64;
        int64_t C = st_channels(e);
        if (C < 1)
            return bn_fail(BNORM_STATUS_SHAPE_MISMATCH, f->F,
                           "%s: tensor \"" ST_NAME_FMT "\": shape of rank %d: must be (C) or (1, C, 1, ...) with C >= 1",
                           f->label, e->name, e->rank);
        if (L->C && C != L->C)
            return bn_fail(BNORM_STATUS_SHAPE_MISMATCH, f->F, "%s: tensor \"" ST_NAME_FMT "\" has %lld channels but \""
                           ST_NAME_FMT "\" has %lld", f->label, e->name, (long long)C, first->name, (long long)L->C);
        first = L->C ? first : e;
        L->C = C;
    }
    if (!L->t[T_WEIGHT] != !L->t[T_BIAS])
        return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: \"" ST_NAME_FMT "%s\" without \"" ST_NAME_FMT "%s\"", f->label, prefix,
                       st_names[L->t[T_WEIGHT] ? T_WEIGHT : T_BIAS], prefix, st_names[L->t[T_WEIGHT] ? T_BIAS : T_WEIGHT]);
    if (!L->t[T_MEAN] != !L->t[T_VAR])
        return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: \"" ST_NAME_FMT "%s\" without \"" ST_NAME_FMT "%s\"", f->label, prefix,
                       st_names[L->t[T_MEAN] ? T_MEAN : T_VAR], prefix, st_names[L->t[T_MEAN] ? T_VAR : T_MEAN]);
    const st_entry *nb = L->t[T_NBT];
    if (nb) {
        if (!L->t[T_MEAN])
            return st_fmt(f, "num_batches_tracked without running_mean and running_var", nb->name);
        if (st_dtypes[nb->dtype].kind != ST_I64)
            return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: tensor \"" ST_NAME_FMT "\": dtype %s: must be I64", f->label,
                           nb->name, st_dtypes[nb->dtype].name);
        if (nb->numel != 1 || nb->rank > 1)
            return st_fmt(f, "shape must be [] (or [1])", nb->name);
    }
    L->affine = L->t[T_WEIGHT] != NULL;
    L->track = L->t[T_MEAN] != NULL;
    bnorm_status st = st_layer_options(f, prefix, L);
    if (st) return st;
    if (L->has_options) {
        const bnorm_layer_options *o = &L->opt;
        if (o->affine != L->affine || o->track_running_stats != L->track || (L->C && o->num_features != L->C))
            return bn_fail(BNORM_STATUS_FORMAT, f->F,
                           "%s: the bnorm options for prefix \"" ST_NAME_FMT "\" (num_features %lld, affine %d, "
                           "track_running_stats %d) contradict its tensors (%lld channels, %s weight/bias, %s running "
                           "statistics)", f->label, prefix, (long long)o->num_features, o->affine,
                           o->track_running_stats, (long long)L->C, L->affine ? "with" : "no", L->track ? "with" : "no");
        if (!L->C) L->C = o->num_features;
    }
    return BNORM_STATUS_OK;
}

/* Reads a per-channel tensor into dst (C values of dtype pd): same dtype bit for bit, otherwise
 * through double, rounded to nearest even. */
static bnorm_status st_read_channels(st_file *f, const st_entry *e, bnorm_dtype pd, void *dst, unsigned char *raw) {
    size_t nb = (size_t)(e->end - e->begin);
    if (st_read(f, f->data_off + e->begin, raw, nb) != 0)
        return bn_fail(BNORM_STATUS_IO, f->F, "%s: tensor \"" ST_NAME_FMT "\": read failed", f->label, e->name);
    int kind = st_dtypes[e->dtype].kind;
    for (uint64_t i = 0; i < e->numel; i++) {
        const unsigned char *p = raw + i * st_dtypes[e->dtype].size;
        if (kind == ST_F16 || kind == ST_BF16) {
            uint16_t h = (uint16_t)(p[0] | p[1] << 8);
            bn_param_set(dst, pd, (int64_t)i, kind == ST_F16 ? bn_f16_to_f32(h) : bn_bf16_to_f32(h));
        } else if (kind == ST_F32) {
            uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
            float v;
            memcpy(&v, &u, 4);
            if (pd == BNORM_DTYPE_F32) memcpy((float *)dst + i, &v, 4);
            else ((double *)dst)[i] = (double)v;
        } else {
            uint64_t u = st_le64(p);
            double v;
            memcpy(&v, &u, 8);
            if (pd == BNORM_DTYPE_F64) memcpy((double *)dst + i, &v, 8);
            else ((float *)dst)[i] = (float)v;
        }
    }
    return BNORM_STATUS_OK;
}

/* The value of num_batches_tracked (validated: I64 holding a value >= 0). */
static bnorm_status st_read_counter(st_file *f, const st_entry *e, int64_t *out) {
    unsigned char raw[8];
    if (st_read(f, f->data_off + e->begin, raw, 8) != 0)
        return bn_fail(BNORM_STATUS_IO, f->F, "%s: tensor \"" ST_NAME_FMT "\": read failed", f->label, e->name);
    uint64_t u = st_le64(raw);
    if (u > (uint64_t)INT64_MAX)
        return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: tensor \"" ST_NAME_FMT "\" = %lld: must be >= 0", f->label,
                       e->name, (long long)(int64_t)u);
    *out = (int64_t)u;
    return BNORM_STATUS_OK;
}

static bnorm_status st_load(bnorm_layer *l, st_file *f, const char *prefix) {
    const char *F = f->F;
    st_layer L;
    bnorm_status st = st_layer_find(f, prefix, &L);
    if (st) return st;
    const bnorm_layer_options *lo = &l->opt;
    const int64_t C = lo->num_features;
    if (!L.C && (lo->affine || lo->track_running_stats))
        return bn_fail(BNORM_STATUS_FORMAT, F, "%s: no tensor named \"" ST_NAME_FMT "%s\" or \"" ST_NAME_FMT
                       "%s\" (wrong prefix? bnorm_state_list shows the layers a file holds)",
                       f->label, prefix, lo->affine ? "weight" : "running_mean", prefix,
                       lo->affine ? "bias" : "running_var");
    if (L.C && L.C != C)
        return bn_fail(BNORM_STATUS_SHAPE_MISMATCH, F, "%s: prefix \"" ST_NAME_FMT "\" holds %lld channels but the layer "
                       "has num_features = %lld", f->label, prefix, (long long)L.C, (long long)C);
    if (L.affine != (lo->affine != 0) || L.track != (lo->track_running_stats != 0))
        return bn_fail(BNORM_STATUS_SHAPE_MISMATCH, F,
                       "%s: prefix \"" ST_NAME_FMT "\" has %s weight/bias and %s running statistics but the layer has "
                       "affine = %d, track_running_stats = %d", f->label, prefix, L.affine ? "a" : "no",
                       L.track ? "" : "no", lo->affine, lo->track_running_stats);

    const bnorm_dtype pd = lo->param_dtype;
    const size_t es = bnorm_dtype_size(pd), sz = (size_t)C * es;
    unsigned char *scratch = (unsigned char *)malloc(4 * sz + (size_t)C * 8 + 8);
    if (!scratch) return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate %zu bytes", 4 * sz + (size_t)C * 8);
    unsigned char *raw = scratch + 4 * sz;
    for (int t = T_WEIGHT; t <= T_VAR; t++)
        if (L.t[t] && (st = st_read_channels(f, L.t[t], pd, scratch + (size_t)t * sz, raw))) {
            free(scratch);
            return st;
        }
    int64_t nbt = 0;
    if (L.t[T_NBT] && (st = st_read_counter(f, L.t[T_NBT], &nbt))) {
        free(scratch);
        return st;
    }
    /* everything is valid: only now is the layer written */
    void *dst[4] = {l->weight, l->bias, l->running_mean, l->running_var};
    for (int t = T_WEIGHT; t <= T_VAR; t++)
        if (L.t[t]) memcpy(dst[t], scratch + (size_t)t * sz, sz);
    free(scratch);
    if (lo->track_running_stats) l->num_batches_tracked = nbt;
    if (L.has_options) {
        l->opt.eps = L.opt.eps;
        l->opt.momentum = L.opt.momentum;
        l->opt.momentum_mode = L.opt.momentum_mode;
        l->opt.freeze = L.opt.freeze;
        l->opt.fused_relu = L.opt.fused_relu;
    }
    l->have_saved = 0; /* statistics and options may have changed under the last forward */
    return BNORM_STATUS_OK;
}

bnorm_status bn_safetensors_load_mem(bnorm_layer *layer, const void *data, size_t size, const char *prefix) {
    static const char *F = "bnorm_layer_load";
    bn_clear_error();
    if (!layer || (!data && size)) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "%s is NULL", layer ? "data" : "layer");
    st_file f;
    bnorm_status st = st_open(&f, F, NULL, (const unsigned char *)(data ? data : ""), size);
    if (!st) st = st_load(layer, &f, prefix ? prefix : "");
    st_close(&f);
    return st;
}

bnorm_status bnorm_layer_load(bnorm_layer *layer, const char *path, const char *prefix) {
    static const char *F = "bnorm_layer_load";
    bn_clear_error();
    if (!layer || !path) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "%s is NULL", layer ? "path" : "layer");
    st_file f;
    bnorm_status st = st_open(&f, F, path, NULL, 0);
    if (!st) st = st_load(layer, &f, prefix ? prefix : "");
    st_close(&f);
    return st;
}


/* ---------------------------------------------------------------------------------------------
 * Listing the layers of a file
 * ------------------------------------------------------------------------------------------- */
typedef struct st_found {
    const char *prefix; /* points into the cJSON tree: the first len bytes */
    size_t len;
    bnorm_layer_options opt;
    int has_options;
} st_found;

static int st_cmp_order(const void *a, const void *b) {
    const st_entry *x = *(const st_entry *const *)a, *y = *(const st_entry *const *)b;
    return x->order < y->order ? -1 : (x->order > y->order);
}

static int st_ends_with(const char *s, size_t n, const char *suffix) {
    size_t k = strlen(suffix);
    return n >= k && memcmp(s + n - k, suffix, k) == 0;
}

/* Adds the layer under the first len bytes of name if it resolves; other layers are skipped. */
static bnorm_status st_try_layer(st_file *f, const char *name, size_t len, st_found *out, size_t *nf) {
    char *p = (char *)malloc(len + 1);
    if (!p) return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, f->F, "cannot allocate a prefix");
    memcpy(p, name, len);
    p[len] = '\0';
    st_layer L;
    bnorm_status st = st_layer_find(f, p, &L);
    free(p);
    if (st == BNORM_STATUS_OUT_OF_MEMORY) return st;
    if (st || !L.C) return BNORM_STATUS_OK;
    int64_t nbt;
    if (L.t[T_NBT] && st_read_counter(f, L.t[T_NBT], &nbt) != BNORM_STATUS_OK) return BNORM_STATUS_OK;
    st_found *e = &out[(*nf)++];
    e->prefix = name;
    e->len = len;
    e->has_options = L.has_options;
    if (L.has_options) {
        e->opt = L.opt;
    } else {
        e->opt = bnorm_layer_options_default(L.C);
        e->opt.affine = L.affine;
        e->opt.track_running_stats = L.track;
        e->opt.param_dtype = L.f64 ? BNORM_DTYPE_F64 : BNORM_DTYPE_F32;
    }
    return BNORM_STATUS_OK;
}

static bnorm_status st_list(st_file *f, bnorm_state_entry **entries, size_t *count) {
    const char *F = f->F;
    size_t nmeta = 0;
    if (f->meta)
        for (const cJSON *c = f->meta->child; c; c = c->next) nmeta++;
    st_found *found = (st_found *)calloc(f->n + nmeta + 1, sizeof *found);
    const st_entry **byorder = (const st_entry **)calloc(f->n + 1, sizeof *byorder);
    size_t nf = 0;
    bnorm_status st = BNORM_STATUS_OK;
    if (!found || !byorder) {
        st = bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate the listing");
        goto done;
    }
    /* layers with running statistics, in header order of their running_mean */
    for (size_t i = 0; i < f->n; i++) byorder[i] = &f->ent[i];
    qsort(byorder, f->n, sizeof *byorder, st_cmp_order);
    for (size_t i = 0; i < f->n && !st; i++) {
        size_t len = strlen(byorder[i]->name);
        if (st_ends_with(byorder[i]->name, len, "running_mean"))
            st = st_try_layer(f, byorder[i]->name, len - strlen("running_mean"), found, &nf);
    }
    /* then layers known only from bnorm's metadata (no running statistics), in metadata order */
    for (const cJSON *c = f->meta ? f->meta->child : NULL; c && !st; c = c->next) {
        size_t len = strlen(c->string);
        if (len < strlen("bnorm.version") || strncmp(c->string, "bnorm.", 6) != 0 ||
            !st_ends_with(c->string, len, "version"))
            continue;
        const char *p = c->string + 6;
        size_t plen = len - 6 - strlen("version");
        char *rm = (char *)malloc(plen + sizeof "running_mean");
        if (!rm) {
            st = bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate a name");
            break;
        }
        memcpy(rm, p, plen);
        memcpy(rm + plen, "running_mean", sizeof "running_mean");
        int seen = st_find(f, rm) != NULL;
        free(rm);
        if (!seen) st = st_try_layer(f, p, plen, found, &nf);
    }
    if (st) goto done;
    *entries = NULL;
    *count = nf;
    if (nf) {
        size_t total = nf * sizeof(bnorm_state_entry);
        for (size_t i = 0; i < nf; i++) total += found[i].len + 1;
        bnorm_state_entry *out = (bnorm_state_entry *)malloc(total);
        if (!out) {
            *count = 0;
            st = bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate %zu bytes for the listing", total);
            goto done;
        }
        char *text = (char *)(out + nf);
        for (size_t i = 0; i < nf; i++) {
            memcpy(text, found[i].prefix, found[i].len);
            text[found[i].len] = '\0';
            out[i].prefix = text;
            out[i].options = found[i].opt;
            out[i].has_options = found[i].has_options;
            text += found[i].len + 1;
        }
        *entries = out;
    }
    bn_clear_error(); /* layers that did not resolve left messages */
done:
    free(found);
    free(byorder);
    return st;
}

bnorm_status bn_safetensors_list_mem(const void *data, size_t size, bnorm_state_entry **entries, size_t *count) {
    static const char *F = "bnorm_state_list";
    bn_clear_error();
    if (!entries || !count) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "%s is NULL", entries ? "count" : "entries");
    *entries = NULL;
    *count = 0;
    if (!data && size) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "data is NULL");
    st_file f;
    bnorm_status st = st_open(&f, F, NULL, (const unsigned char *)(data ? data : ""), size);
    if (!st) st = st_list(&f, entries, count);
    st_close(&f);
    return st;
}

bnorm_status bnorm_state_list(const char *path, bnorm_state_entry **entries, size_t *count) {
    static const char *F = "bnorm_state_list";
    bn_clear_error();
    if (!path || !entries || !count)
        return bn_fail(BNORM_STATUS_NULL_POINTER, F, "%s is NULL", !path ? "path" : !entries ? "entries" : "count");
    *entries = NULL;
    *count = 0;
    st_file f;
    bnorm_status st = st_open(&f, F, path, NULL, 0);
    if (!st) st = st_list(&f, entries, count);
    st_close(&f);
    return st;
}

void bnorm_state_list_free(bnorm_state_entry *entries) { free(entries); }

/* ---------------------------------------------------------------------------------------------
 * Saving
 * ------------------------------------------------------------------------------------------- */
typedef struct st_buf {
    unsigned char *p;
    size_t n, cap;
    int oom;
} st_buf;

static void sb_put(st_buf *b, const void *s, size_t n) {
    if (b->oom) return;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n) cap *= 2;
        unsigned char *q = (unsigned char *)realloc(b->p, cap);
        if (!q) {
            b->oom = 1;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}
static void sb_str(st_buf *b, const char *s) { sb_put(b, s, strlen(s)); }

/* A JSON string of s1 s2 s3 (NULL parts skipped): quotes, backslashes and control characters escaped (the text is valid UTF-8). */
static void sb_json(st_buf *b, const char *s1, const char *s2, const char *s3) {
    const char *part[3] = {s1, s2, s3};
    sb_str(b, "\"");
    for (int k = 0; k < 3; k++)
        for (const unsigned char *s = (const unsigned char *)part[k]; s && *s; s++) {
            char esc[8];
            if (*s == '"' || *s == '\\') {
                esc[0] = '\\';
                esc[1] = (char)*s;
                sb_put(b, esc, 2);
            } else if (*s < 0x20) {
                snprintf(esc, sizeof esc, "\\u%04x", *s);
                sb_str(b, esc);
            } else {
                sb_put(b, s, 1);
            }
        }
    sb_str(b, "\"");
}

static void sb_meta(st_buf *b, const char *prefix, const char *key, const char *value) {
    sb_str(b, ",");
    sb_json(b, "bnorm.", prefix, key);
    sb_str(b, ":");
    sb_json(b, value, NULL, NULL);
}

static void st_put_le(unsigned char *d, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++) d[i] = (unsigned char)(v >> (8 * i));
}

/* Writes the chunks to a temporary file next to path, syncs it and renames it over path. */
static bnorm_status st_write_atomic(const char *F, const char *path, const unsigned char *const *chunk,
                                    const size_t *len, int nchunks) {
    static atomic_uint counter;
    int step = 0;
    const char *what = "create";
    size_t pl = strlen(path);
    char *tmp = (char *)malloc(pl + 64), *dir = (char *)malloc(pl + 2);
    FILE *fp = NULL;
    int fd = -1, err = 0;
    bnorm_status st = BNORM_STATUS_OK;
    if (!tmp || !dir) {
        free(tmp);
        free(dir);
        return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate file names");
    }
    const char *slash = strrchr(path, '/');
    if (!slash) strcpy(dir, ".");
    else if (slash == path) strcpy(dir, "/");
    else {
        memcpy(dir, path, (size_t)(slash - path));
        dir[slash - path] = '\0';
    }
    for (int tries = 0;; tries++) {
        snprintf(tmp, pl + 64, "%s.tmp-%ld-%u", path, (long)getpid(), atomic_fetch_add(&counter, 1u));
        if (st_inject(&step, what)) break;
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd >= 0 || errno != EEXIST || tries >= 100) break;
    }
    if (fd < 0) {
        err = errno;
        st = bn_fail(BNORM_STATUS_IO, F, "%s: cannot create the temporary file %s: %s (the destination is unchanged)",
                     path, tmp, strerror(err));
        goto out;
    }
    fp = fdopen(fd, "wb");
    if (!fp) {
        err = errno;
        close(fd);
        goto fail;
    }
    for (int i = 0; i < nchunks; i++) {
        what = "write";
        if (st_inject(&step, what)) {
            err = errno;
            fwrite(chunk[i], 1, len[i] / 2, fp);
            goto fail;
        }
        if (fwrite(chunk[i], 1, len[i], fp) != len[i]) {
            err = errno ? errno : EIO;
            goto fail;
        }
    }
    what = "flush";
    if (st_inject(&step, what) || fflush(fp) != 0) { err = errno; goto fail; }
    what = "fsync";
    if (st_inject(&step, what) || fsync(fileno(fp)) != 0) { err = errno; goto fail; }
    what = "close";
    if (st_inject(&step, what)) {
        err = errno;
        goto fail;
    }
    {
        int rc = fclose(fp);
        fp = NULL;
        if (rc != 0) { err = errno; goto fail; }
    }
    what = "rename";
    if (st_inject(&step, what) || rename(tmp, path) != 0) { err = errno; goto fail; }
    /* from here on the destination holds the complete new file; make the rename itself durable */
    what = "open directory";
    int dfd = st_inject(&step, what) ? -1 : open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) {
        err = errno;
    } else {
        what = "fsync directory";
        if (st_inject(&step, what) || fsync(dfd) != 0) err = errno;
        if (err == EINVAL || err == ENOTSUP) err = 0; /* file systems that cannot sync directories */
        close(dfd);
    }
    if (err)
        st = bn_fail(BNORM_STATUS_IO, F, "%s: saved, but %s of %s failed: %s (the new file is complete but its "
                     "name may not survive a system crash)", path, what, dir, strerror(err));
    goto out;
fail:
    if (fp) fclose(fp);
    unlink(tmp);
    st = bn_fail(BNORM_STATUS_IO, F, "%s: %s of the temporary file failed: %s (the destination is unchanged)", path,
                 what, strerror(err ? err : EIO));
out:
    free(tmp);
    free(dir);
    return st;
}

bnorm_status bnorm_layer_save(const bnorm_layer *l, const char *path, const char *prefix) {
    static const char *F = "bnorm_layer_save";
    bn_clear_error();
    if (!l || !path) return bn_fail(BNORM_STATUS_NULL_POINTER, F, "%s is NULL", l ? "path" : "layer");
    if (!path[0]) return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "path is empty");
    if (!prefix) prefix = "";
    for (size_t i = 0, n = strlen(prefix); i < n;) {
        size_t k = (unsigned char)prefix[i] < 0x80 ? 1 : st_utf8_seq((const unsigned char *)prefix + i, n - i);
        if (!k) return bn_fail(BNORM_STATUS_INVALID_ARGUMENT, F, "prefix byte %zu: invalid UTF-8 (tensor names are JSON text)", i);
        i += k;
    }
    const bnorm_layer_options *o = &l->opt;
    const int64_t C = o->num_features;
    const bnorm_dtype pd = o->param_dtype;
    const size_t es = bnorm_dtype_size(pd), sz = (size_t)C * es;
    const char *dname = pd == BNORM_DTYPE_F64 ? "F64" : "F32";

    st_buf h = {0};
    char num[64], num2[64];
    sb_str(&h, "{\"__metadata__\":{\"format\":\"pt\"");
    const char *vals[M_COUNT];
    char cbuf[32], eps[40], mom[40];
    snprintf(cbuf, sizeof cbuf, "%lld", (long long)C);
    st_fmt_double(eps, sizeof eps, o->eps);
    st_fmt_double(mom, sizeof mom, o->momentum);
    vals[M_VERSION] = "1";
    vals[M_NUM_FEATURES] = cbuf;
    vals[M_PARAM_DTYPE] = pd == BNORM_DTYPE_F64 ? "float64" : "float32";
    vals[M_EPS] = eps;
    vals[M_MOMENTUM] = mom;
    vals[M_MOMENTUM_MODE] = st_modes[o->momentum_mode];
    vals[M_AFFINE] = o->affine ? "1" : "0";
    vals[M_TRACK] = o->track_running_stats ? "1" : "0";
    vals[M_FREEZE] = o->freeze ? "1" : "0";
    vals[M_FUSED] = o->fused_relu ? "1" : "0";
    for (int k = 0; k < M_COUNT; k++) sb_meta(&h, prefix, st_meta_keys[k], vals[k]);
    sb_str(&h, "}");
    /* data: num_batches_tracked first so that every tensor starts on a multiple of its size */
    uint64_t at = 0;
    const void *src[T_COUNT] = {l->weight, l->bias, l->running_mean, l->running_var, NULL};
    int order[T_COUNT] = {T_NBT, T_WEIGHT, T_BIAS, T_MEAN, T_VAR};
    for (int j = 0; j < T_COUNT; j++) {
        int t = order[j];
        int have = t == T_NBT ? o->track_running_stats : t <= T_BIAS ? o->affine : o->track_running_stats;
        if (!have) continue;
        uint64_t nb = t == T_NBT ? 8 : sz;
        sb_str(&h, ",");
        sb_json(&h, prefix, st_names[t], NULL);
        if (t == T_NBT) {
            sb_str(&h, ":{\"dtype\":\"I64\",\"shape\":[],");
        } else {
            snprintf(num, sizeof num, ":{\"dtype\":\"%s\",\"shape\":[%lld],", dname, (long long)C);
            sb_str(&h, num);
        }
        snprintf(num2, sizeof num2, "\"data_offsets\":[%llu,%llu]}", (unsigned long long)at,
                 (unsigned long long)(at + nb));
        sb_str(&h, num2);
        at += nb;
    }
    sb_str(&h, "}");
    while (h.n % 8) sb_str(&h, " "); /* the data area starts on a multiple of 8, as the reference writer does */
    unsigned char *data = (unsigned char *)malloc(at ? (size_t)at : 1);
    if (h.oom || !data) {
        free(h.p);
        free(data);
        return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate the file image");
    }
    unsigned char *d = data;
    for (int j = 0; j < T_COUNT; j++) {
        int t = order[j];
        if (t == T_NBT) {
            if (!o->track_running_stats) continue;
            st_put_le(d, (uint64_t)l->num_batches_tracked, 8);
            d += 8;
            continue;
        }
        if (!src[t]) continue;
        for (int64_t i = 0; i < C; i++, d += es) {
            uint64_t u = 0;
            if (es == 8) memcpy(&u, (const double *)src[t] + i, 8);
            else {
                uint32_t u32;
                memcpy(&u32, (const float *)src[t] + i, 4);
                u = u32;
            }
            st_put_le(d, u, (int)es);
        }
    }
    unsigned char len8[8];
    st_put_le(len8, (uint64_t)h.n, 8);
    const unsigned char *chunks[3] = {len8, h.p, data};
    size_t lens[3] = {8, h.n, (size_t)at};
    bnorm_status st = st_write_atomic(F, path, chunks, lens, 3);
    free(h.p);
    free(data);
    return st;
}
