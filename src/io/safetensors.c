/*
 * safetensors.c - a layer's state as a safetensors file under PyTorch state_dict names.
 *
 * Reading treats the file as hostile: the header is bounded, checked as UTF-8, parsed here in two passes
 * (syntax and limits first, then one fixed-size record per tensor; see "The header's JSON"), and
 * every entry of the whole file (not only the tensors we want) is validated against the data area
 * before anything is copied; the layer is written only after all of its tensors have been read and
 * converted into scratch arrays. Writing builds the whole file in memory, then goes through a temporary
 * file in the destination's directory (anonymous where the system allows: write, fsync, link, close,
 * rename, fsync of the directory) so the destination is replaced whole or not at all. See docs/state.md for the format and its rules.
 */
#define _GNU_SOURCE /* O_TMPFILE */
#define _POSIX_C_SOURCE 200809L

#include "../layer/layer_internal.h"

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
#define ST_MAX_EXACT 9007199254740992ull /* 2^53: JSON numbers above it are not exact doubles */
#define ST_MAX_ENTRIES 1000000           /* tensors in a header, and __metadata__ entries */
#define ST_MAX_RANK 64                   /* dimensions of a shape (numpy's limit; PyTorch's is lower) */
#define ST_MAX_DEPTH 16                  /* nesting of JSON values (a valid header needs 3) */
#define ST_STR_(x) #x
#define ST_STR(x) ST_STR_(x)
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
    const char *name; /* decoded in place inside the header copy */
    int dtype;        /* index into st_dtypes */
    int rank;
    int64_t channels; /* C of a shape (C) or (1, C, 1, ...), else 0 */
    uint64_t numel, begin, end; /* offsets relative to the data area */
    size_t order;               /* position in the header */
} st_entry;

/* One __metadata__ pair; key and value point into the header copy, so key order is file order. */
typedef struct st_meta {
    const char *key, *value;
} st_meta;

typedef struct st_file {
    const char *F;     /* the public function, for messages */
    const char *label; /* the path, for messages */
    FILE *fp;          /* the source: a file ... */
    const unsigned char *mem; /* ... or bytes in memory (fuzzing) */
    uint64_t size;
    uint64_t data_off, data_size;
    char *hdr;         /* the header, its strings decoded in place; names point into it */
    int has_meta;
    st_meta *meta;     /* sorted by key */
    size_t nmeta;
    st_entry *ent;     /* sorted by name */
    size_t n, cap;
} st_file;

static void st_close(st_file *f) {
    if (f->fp) fclose(f->fp);
    free(f->hdr);
    free(f->meta);
    free(f->ent);
    f->fp = NULL;
    f->hdr = NULL;
    f->meta = NULL;
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
 * escape \u0000: a C string would end there, so two readers could see different names. */
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

static int st_cmp_name(const void *a, const void *b) {
    return strcmp(((const st_entry *)a)->name, ((const st_entry *)b)->name);
}
static int st_cmp_offset(const void *a, const void *b) {
    const st_entry *x = (const st_entry *)a, *y = (const st_entry *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->order < y->order ? -1 : (x->order > y->order);
}
static int st_cmp_meta(const void *a, const void *b) {
    return strcmp(((const st_meta *)a)->key, ((const st_meta *)b)->key);
}

static bnorm_status st_fmt(st_file *f, const char *fmt_rule, const char *name) {
    if (name) return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: tensor \"" ST_NAME_FMT "\": %s", f->label, name, fmt_rule);
    return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: %s", f->label, fmt_rule);
}

/* ---------------------------------------------------------------------------------------------
 * The header's JSON, in two passes over the header text and nothing else.
 * Pass 1 checks the syntax of the whole text and counts (top-level members, __metadata__ members,
 * nesting), with no allocation, so that an absurd header is refused before anything is built.
 * Pass 2 walks the (now known valid) text again, decodes strings in place and keeps per tensor one
 * fixed-size record: the memory of a load or a listing is the header's bytes plus a small multiple
 * of them, never a node per JSON token.
 * ------------------------------------------------------------------------------------------- */
typedef struct st_scan {
    const char *s;
    size_t n, i;
    size_t members, meta_members; /* tensors (top-level members); members of __metadata__ objects */
    const char *why;              /* a limit that was exceeded (NULL: a syntax error) */
} st_scan;

static void st_ws(const char *s, size_t n, size_t *i) {
    while (*i < n && (s[*i] == ' ' || s[*i] == '\t' || s[*i] == '\n' || s[*i] == '\r')) ++*i;
}

static int st_hex(int c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* A JSON string at s[*i] == '"'; on success *i is past the closing quote. */
static int st_scan_string(st_scan *p) {
    const char *s = p->s;
    size_t i = p->i + 1;
    for (;;) {
        if (i >= p->n) return 0;
        unsigned char c = (unsigned char)s[i];
        if (c == '"') break;
        if (c < 0x20) return 0;
        if (c == '\\') {
            if (i + 1 >= p->n) return 0;
            char e = s[i + 1];
            if (e == 'u') {
                if (i + 5 >= p->n) return 0;
                for (int k = 2; k < 6; k++)
                    if (st_hex(s[i + k]) < 0) return 0;
                i += 6;
                continue;
            }
            if (!strchr("\"\\/bfnrt", e) || !e) return 0;
            i += 2;
            continue;
        }
        i++;
    }
    p->i = i + 1;
    return 1;
}

static int st_scan_number(st_scan *p) {
    const char *s = p->s;
    size_t i = p->i, n = p->n;
    if (i < n && s[i] == '-') i++;
    if (i >= n || s[i] < '0' || s[i] > '9') return 0;
    if (s[i] == '0') i++;
    else while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    if (i < n && s[i] == '.') {
        i++;
        if (i >= n || s[i] < '0' || s[i] > '9') return 0;
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) i++;
        if (i >= n || s[i] < '0' || s[i] > '9') return 0;
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    }
    p->i = i;
    return 1;
}

/* One JSON value at p->i. depth: 1 for the root. kind: 0 anywhere, 1 the root, 2 __metadata__. */
static int st_scan_value(st_scan *p, int depth, int kind) {
    const char *s = p->s;
    if (depth > ST_MAX_DEPTH) {
        p->why = "values nested deeper than " ST_STR(ST_MAX_DEPTH) " levels";
        return 0;
    }
    st_ws(s, p->n, &p->i);
    if (p->i >= p->n) return 0;
    char c = s[p->i];
    if (c == '{' || c == '[') {
        const char close = c == '{' ? '}' : ']';
        p->i++;
        st_ws(s, p->n, &p->i);
        if (p->i < p->n && s[p->i] == close) {
            p->i++;
            return 1;
        }
        for (;;) {
            int sub = 0;
            if (c == '{') {
                st_ws(s, p->n, &p->i);
                if (p->i >= p->n || s[p->i] != '"') return 0;
                size_t k0 = p->i;
                if (!st_scan_string(p)) return 0;
                if (kind == 1) {
                    if (p->i - k0 == 14 && memcmp(s + k0, "\"__metadata__\"", 14) == 0) sub = 2;
                    else if (++p->members > ST_MAX_ENTRIES) {
                        p->why = "more than " ST_STR(ST_MAX_ENTRIES) " tensors";
                        return 0;
                    }
                } else if (kind == 2 && ++p->meta_members > ST_MAX_ENTRIES) {
                    p->why = "more than " ST_STR(ST_MAX_ENTRIES) " __metadata__ entries";
                    return 0;
                }
                st_ws(s, p->n, &p->i);
                if (p->i >= p->n || s[p->i] != ':') return 0;
                p->i++;
            }
            if (!st_scan_value(p, depth + 1, sub)) return 0;
            st_ws(s, p->n, &p->i);
            if (p->i >= p->n) return 0;
            if (s[p->i] == close) {
                p->i++;
                return 1;
            }
            if (s[p->i] != ',') return 0;
            p->i++;
        }
    }
    if (c == '"') return st_scan_string(p);
    if (c == '-' || (c >= '0' && c <= '9')) return st_scan_number(p);
    static const char *const lit[3] = {"true", "false", "null"};
    for (int k = 0; k < 3; k++) {
        size_t l = strlen(lit[k]);
        if (p->n - p->i >= l && memcmp(s + p->i, lit[k], l) == 0) {
            p->i += l;
            return 1;
        }
    }
    return 0;
}

/* Pass 2: the walker over text that pass 1 accepted. */
typedef struct st_walk {
    st_file *f;
    char *s;
    size_t n, i;
} st_walk;

static char st_peek(st_walk *w) {
    st_ws(w->s, w->n, &w->i);
    return w->i < w->n ? w->s[w->i] : '\0';
}

/* Consumes c (after white space) if it is next. */
static int st_eat(st_walk *w, char c) {
    if (st_peek(w) != c) return 0;
    w->i++;
    return 1;
}

static void st_put_utf8(char **o, uint32_t cp) {
    unsigned char *q = (unsigned char *)*o;
    if (cp < 0x80) *q++ = (unsigned char)cp;
    else if (cp < 0x800) { *q++ = (unsigned char)(0xc0 | cp >> 6); *q++ = (unsigned char)(0x80 | (cp & 0x3f)); }
    else if (cp < 0x10000) {
        *q++ = (unsigned char)(0xe0 | cp >> 12);
        *q++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        *q++ = (unsigned char)(0x80 | (cp & 0x3f));
    } else {
        *q++ = (unsigned char)(0xf0 | cp >> 18);
        *q++ = (unsigned char)(0x80 | ((cp >> 12) & 0x3f));
        *q++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        *q++ = (unsigned char)(0x80 | (cp & 0x3f));
    }
    *o = (char *)q;
}

static uint32_t st_u4(const char *s) {
    return (uint32_t)(st_hex(s[0]) << 12 | st_hex(s[1]) << 8 | st_hex(s[2]) << 4 | st_hex(s[3]));
}

/* Decodes the string at w->i (a '"') in place and NUL-terminates it (the decoded text is never
 * longer than the escaped one, so the NUL lands at or before the closing quote). */
static bnorm_status st_string(st_walk *w, const char **out) {
    st_peek(w);
    size_t at = w->i;
    char *s = w->s, *o = s + w->i + 1;
    size_t i = w->i + 1;
    *out = o;
    while (s[i] != '"') {
        if (s[i] != '\\') {
            *o++ = s[i++];
            continue;
        }
        char e = s[i + 1];
        i += 2;
        if (e != 'u') {
            *o++ = e == 'b' ? '\b' : e == 'f' ? '\f' : e == 'n' ? '\n' : e == 'r' ? '\r' : e == 't' ? '\t' : e;
            continue;
        }
        uint32_t cp = st_u4(s + i);
        i += 4;
        if (cp >= 0xd800 && cp <= 0xdbff && s[i] == '\\' && s[i + 1] == 'u') {
            uint32_t lo = st_u4(s + i + 2);
            if (lo >= 0xdc00 && lo <= 0xdfff) {
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                i += 6;
            }
        }
        if (cp >= 0xd800 && cp <= 0xdfff)
            return bn_fail(BNORM_STATUS_FORMAT, w->f->F, "%s: header byte %zu: a \\u escape of a lone UTF-16 surrogate",
                           w->f->label, at);
        st_put_utf8(&o, cp);
    }
    *o = '\0';
    w->i = i + 1;
    return BNORM_STATUS_OK;
}

/* Skips any value (its syntax is known to be valid). */
static void st_skip(st_walk *w) {
    const char *s = w->s;
    char c = st_peek(w);
    if (c != '{' && c != '[' && c != '"') {
        while (w->i < w->n && !strchr(",]} \t\r\n", s[w->i])) w->i++;
        return;
    }
    int depth = 0;
    do {
        c = s[w->i];
        if (c == '"') {
            for (w->i++; s[w->i] != '"'; w->i++)
                if (s[w->i] == '\\') w->i++;
        } else if (c == '{' || c == '[') depth++;
        else if (c == '}' || c == ']') depth--;
        w->i++;
    } while (depth > 0);
}

/* A number that is a plain non-negative integer <= 2^53 (no sign, fraction or exponent, as every
 * writer emits shapes and offsets, and as the reference reader requires). Consumed either way. */
static int st_uint(st_walk *w, uint64_t *out) {
    const char *s = w->s;
    char c = st_peek(w);
    if (c != '-' && (c < '0' || c > '9')) {
        st_skip(w);
        return 0;
    }
    uint64_t v = 0;
    int ok = 1;
    for (; w->i < w->n && s[w->i] >= '0' && s[w->i] <= '9'; w->i++) {
        v = v * 10 + (uint64_t)(s[w->i] - '0');
        if (v > ST_MAX_EXACT) ok = 0;
        if (!ok) v = ST_MAX_EXACT + 1; /* keeps v from wrapping */
    }
    if (w->i < w->n && strchr("-.eE", s[w->i])) {
        ok = 0;
        st_skip(w);
    }
    *out = v;
    return ok;
}

/* One tensor entry: {"dtype": ..., "shape": [...], "data_offsets": [b, e]} in any order; other
 * members are skipped. Nothing of the shape is kept but its rank, element count and channel count. */
static bnorm_status st_walk_entry(st_walk *w, st_entry *e) {
    st_file *f = w->f;
    const char *name = e->name;
    if (st_peek(w) != '{') return st_fmt(f, "the entry is not an object", name);
    w->i++;
    int seen_dt = 0, seen_shape = 0, seen_offs = 0;
    bnorm_status st;
    while (!st_eat(w, '}')) {
        st_eat(w, ',');
        const char *key;
        if ((st = st_string(w, &key))) return st;
        st_eat(w, ':');
        if (strcmp(key, "dtype") == 0) {
            if (seen_dt++) return st_fmt(f, "\"dtype\" appears twice", name);
            if (st_peek(w) != '"') return st_fmt(f, "\"dtype\" is not a string", name);
            const char *dt;
            if ((st = st_string(w, &dt))) return st;
            e->dtype = -1;
            for (size_t i = 0; i < ST_NDTYPES; i++)
                if (strcmp(dt, st_dtypes[i].name) == 0) e->dtype = (int)i;
            if (e->dtype < 0)
                return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: tensor \"" ST_NAME_FMT "\": unknown dtype \"%.40s\"",
                               f->label, name, dt);
        } else if (strcmp(key, "shape") == 0) {
            if (seen_shape++) return st_fmt(f, "\"shape\" appears twice", name);
            if (!st_eat(w, '[')) return st_fmt(f, "\"shape\" is not an array", name);
            int rank = 0, zero = 0, wide = 0, ones = 1;
            uint64_t prod = 1, d0 = 0, d1 = 0;
            while (!st_eat(w, ']')) {
                st_eat(w, ',');
                uint64_t v;
                if (!st_uint(w, &v)) return st_fmt(f, "a \"shape\" entry is not an integer in [0, 2^53]", name);
                if (++rank > ST_MAX_RANK)
                    return st_fmt(f, "\"shape\" has more than " ST_STR(ST_MAX_RANK) " dimensions", name);
                if (rank == 1) d0 = v;
                else if (rank == 2) d1 = v;
                if (rank != 2 && v != 1) ones = 0;
                if (v == 0) zero = 1;
                else if (prod > UINT64_MAX / v) wide = 1;
                else prod *= v;
            }
            if (!zero && wide) return st_fmt(f, "the element count of \"shape\" overflows 64 bits", name);
            e->rank = rank;
            e->numel = zero ? 0 : prod;
            e->channels = rank == 1 ? (int64_t)d0 : rank >= 2 && d0 == 1 && ones ? (int64_t)d1 : 0;
        } else if (strcmp(key, "data_offsets") == 0) {
            if (seen_offs++) return st_fmt(f, "\"data_offsets\" appears twice", name);
            int k = 0, ok = st_eat(w, '[');
            if (!ok) st_skip(w);
            while (ok && !st_eat(w, ']')) {
                st_eat(w, ',');
                uint64_t v;
                if (!st_uint(w, &v) || k >= 2) ok = 0;
                else *(k++ ? &e->end : &e->begin) = v;
            }
            if (!ok || k != 2) return st_fmt(f, "\"data_offsets\" is not an array of two integers in [0, 2^53]", name);
        } else {
            st_skip(w);
        }
    }
    if (!seen_dt) return st_fmt(f, "no \"dtype\"", name);
    if (!seen_shape) return st_fmt(f, "no \"shape\"", name);
    if (!seen_offs) return st_fmt(f, "no \"data_offsets\"", name);
    return BNORM_STATUS_OK;
}

/* The entry's offsets against the data area and its shape. */
static bnorm_status st_check_offsets(st_file *f, const st_entry *e) {
    const char *name = e->name;
    if (e->begin > e->end)
        return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: tensor \"" ST_NAME_FMT "\": data_offsets [%llu, %llu]: begin > end",
                       f->label, name, (unsigned long long)e->begin, (unsigned long long)e->end);
    if (e->end > f->data_size)
        return bn_fail(BNORM_STATUS_FORMAT, f->F,
                       "%s: tensor \"" ST_NAME_FMT "\": data_offsets [%llu, %llu] end beyond the data area of %llu bytes",
                       f->label, name, (unsigned long long)e->begin, (unsigned long long)e->end,
                       (unsigned long long)f->data_size);
    uint64_t es = st_dtypes[e->dtype].size;
    if (e->numel > UINT64_MAX / es || e->numel * es != e->end - e->begin)
        return bn_fail(BNORM_STATUS_FORMAT, f->F,
                       "%s: tensor \"" ST_NAME_FMT "\": data_offsets [%llu, %llu] span %llu bytes but shape x %s size "
                       "needs %llu elements x %u bytes",
                       f->label, name, (unsigned long long)e->begin, (unsigned long long)e->end,
                       (unsigned long long)(e->end - e->begin), st_dtypes[e->dtype].name, (unsigned long long)e->numel,
                       (unsigned)es);
    return BNORM_STATUS_OK;
}

/* __metadata__: an object of strings, kept as (key, value) pairs. cap: the count of pass 1 (which
 * misses a key "__metadata__" written with escapes: then the array grows). */
static bnorm_status st_walk_metadata(st_walk *w, size_t cap) {
    st_file *f = w->f;
    if (st_peek(w) != '{') return st_fmt(f, "__metadata__ is not an object of strings", NULL);
    w->i++;
    cap = cap ? cap : 1;
    f->meta = (st_meta *)malloc(cap * sizeof *f->meta);
    if (!f->meta)
        return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, f->F, "%s: cannot allocate %zu metadata entries", f->label, cap);
    bnorm_status st;
    while (!st_eat(w, '}')) {
        st_eat(w, ',');
        const char *key, *val;
        if ((st = st_string(w, &key))) return st;
        st_eat(w, ':');
        if (st_peek(w) != '"')
            return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: __metadata__ entry \"" ST_NAME_FMT "\" is not a string",
                           f->label, key);
        if ((st = st_string(w, &val))) return st;
        if (f->nmeta == cap) {
            if (cap >= ST_MAX_ENTRIES)
                return st_fmt(f, "the header has more than " ST_STR(ST_MAX_ENTRIES) " __metadata__ entries", NULL);
            st_meta *q = (st_meta *)realloc(f->meta, 2 * cap * sizeof *q);
            if (!q)
                return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, f->F, "%s: cannot allocate %zu metadata entries", f->label,
                               2 * cap);
            f->meta = q;
            cap *= 2;
        }
        f->meta[f->nmeta].key = key;
        f->meta[f->nmeta].value = val;
        f->nmeta++;
    }
    qsort(f->meta, f->nmeta, sizeof *f->meta, st_cmp_meta);
    for (size_t i = 1; i < f->nmeta; i++)
        if (strcmp(f->meta[i - 1].key, f->meta[i].key) == 0)
            return bn_fail(BNORM_STATUS_FORMAT, f->F, "%s: __metadata__ key \"" ST_NAME_FMT "\" appears twice", f->label,
                           f->meta[i].key);
    return BNORM_STATUS_OK;
}

/* Reads and validates the whole header. Exactly one of path / mem is given. */
static bnorm_status st_open(st_file *f, const char *F, const char *path, const unsigned char *mem, size_t mem_size) {
    memset(f, 0, sizeof *f);
    f->F = F;
    f->label = path ? path : "<memory>";
    if (path) {
        /* O_NONBLOCK: opening a FIFO (or a device) must not wait for a writer; only regular files are
         * read, and their reads never block, so the flag is cleared again after the check */
        int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) return bn_fail(BNORM_STATUS_IO, F, "%s: cannot open: %s", path, strerror(errno));
        struct stat sb;
        if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
            close(fd);
            return bn_fail(BNORM_STATUS_IO, F, "%s: not a regular file", path);
        }
        int fl = fcntl(fd, F_GETFL);
        if (fl == -1 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) == -1 || !(f->fp = fdopen(fd, "rb"))) {
            int err = errno;
            close(fd);
            return bn_fail(BNORM_STATUS_IO, F, "%s: cannot open: %s", path, strerror(err));
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
    char *hdr = f->hdr = (char *)malloc((size_t)n + 1);
    if (!hdr) return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "%s: cannot allocate a header of %llu bytes", f->label,
                             (unsigned long long)n);
    if (st_read(f, 8, hdr, (size_t)n) != 0) return bn_fail(BNORM_STATUS_IO, F, "%s: cannot read the header", f->label);
    hdr[n] = '\0';
    size_t where = 0;
    const char *bad = st_check_text((const unsigned char *)hdr, (size_t)n, &where);
    if (bad) return bn_fail(BNORM_STATUS_FORMAT, F, "%s: header byte %zu: %s", f->label, where, bad);
    if (hdr[0] != '{') return st_fmt(f, "the header does not start with '{'", NULL);

    st_scan sc = {.s = hdr, .n = (size_t)n};
    if (!st_scan_value(&sc, 1, 1)) {
        if (sc.why)
            return bn_fail(BNORM_STATUS_FORMAT, F, "%s: the header has %s (this reader's limit; refused near byte %zu)",
                           f->label, sc.why, sc.i);
        return bn_fail(BNORM_STATUS_FORMAT, F, "%s: the header is not valid JSON (error near byte %zu)", f->label, sc.i);
    }
    st_ws(hdr, (size_t)n, &sc.i);
    if (sc.i < n)
        return bn_fail(BNORM_STATUS_FORMAT, F, "%s: header byte %zu: text after the JSON object", f->label, sc.i);

    st_walk w = {.f = f, .s = hdr, .n = (size_t)n, .i = 1};
    size_t order = 0;
    bnorm_status st;
    for (; !st_eat(&w, '}'); order++) {
        st_eat(&w, ',');
        const char *name;
        if ((st = st_string(&w, &name))) return st;
        st_eat(&w, ':');
        if (strcmp(name, "__metadata__") == 0) {
            if (f->has_meta) return st_fmt(f, "__metadata__ appears twice", NULL);
            f->has_meta = 1;
            if ((st = st_walk_metadata(&w, sc.meta_members))) return st;
            continue;
        }
        if (f->n == f->cap) { /* grown as valid entries arrive: memory follows what the header really holds */
            size_t cap = f->cap ? 2 * f->cap : 16;
            st_entry *q = (st_entry *)realloc(f->ent, cap * sizeof *q);
            if (!q) return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "%s: cannot allocate %zu entries", f->label, cap);
            f->ent = q;
            f->cap = cap;
        }
        st_entry *e = &f->ent[f->n];
        memset(e, 0, sizeof *e);
        e->name = name;
        e->order = order;
        if ((st = st_walk_entry(&w, e)) || (st = st_check_offsets(f, e))) return st;
        f->n++;
    }
    /* the tensors must tile the data area: no overlap, no hole, nothing after the last one */
    if (f->n) qsort(f->ent, f->n, sizeof *f->ent, st_cmp_offset);
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
    if (f->n) qsort(f->ent, f->n, sizeof *f->ent, st_cmp_name);
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
    st_meta k = {key, NULL};
    const st_meta *m = f->nmeta ? (const st_meta *)bsearch(&k, f->meta, f->nmeta, sizeof k, st_cmp_meta) : NULL;
    return m ? m->value : NULL;
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
        int64_t C = e->channels;
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
    const char *prefix; /* points into the header copy: the first len bytes */
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

/* The layers found so far; grown by doubling (a layer needs at least one tensor or ten metadata
 * entries of the header, so this stays a fraction of the header's size). */
typedef struct st_found_list {
    st_found *v;
    size_t n, cap;
} st_found_list;

/* Adds the layer under the first len bytes of name if it resolves; other layers are skipped. */
static bnorm_status st_try_layer(st_file *f, const char *name, size_t len, st_found_list *out) {
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
    if (out->n == out->cap) {
        size_t cap = out->cap ? 2 * out->cap : 16;
        st_found *q = (st_found *)realloc(out->v, cap * sizeof *q);
        if (!q) return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, f->F, "cannot allocate the listing");
        out->v = q;
        out->cap = cap;
    }
    st_found *e = &out->v[out->n++];
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

static int st_cmp_ptr(const void *a, const void *b) {
    const char *x = *(const char *const *)a, *y = *(const char *const *)b;
    return x < y ? -1 : (x > y);
}

static int st_is_version_key(const char *k, size_t len) {
    return len >= strlen("bnorm.version") && strncmp(k, "bnorm.", 6) == 0 && st_ends_with(k, len, "version");
}

/* Every lookup below is a binary search in the sorted tensors or metadata: the listing takes time
 * O(h log h) in the header's size h, with no rescan of the header per layer. */
static bnorm_status st_list(st_file *f, bnorm_state_entry **entries, size_t *count) {
    const char *F = f->F;
    st_found_list fl = {0};
    const st_entry **byorder = (const st_entry **)calloc(f->n + 1, sizeof *byorder);
    const char **vkeys = NULL;
    size_t nv = 0;
    for (size_t i = 0; i < f->nmeta; i++) nv += st_is_version_key(f->meta[i].key, strlen(f->meta[i].key));
    vkeys = (const char **)malloc((nv + 1) * sizeof *vkeys);
    bnorm_status st = BNORM_STATUS_OK;
    if (!vkeys || !byorder) {
        st = bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate the listing");
        goto done;
    }
    /* layers with running statistics, in header order of their running_mean */
    for (size_t i = 0; i < f->n; i++) byorder[i] = &f->ent[i];
    qsort(byorder, f->n, sizeof *byorder, st_cmp_order);
    for (size_t i = 0; i < f->n && !st; i++) {
        size_t len = strlen(byorder[i]->name);
        if (st_ends_with(byorder[i]->name, len, "running_mean"))
            st = st_try_layer(f, byorder[i]->name, len - strlen("running_mean"), &fl);
    }
    /* then layers known only from bnorm's metadata (no running statistics), in metadata order (the
     * keys point into the header, so their addresses are their order) */
    nv = 0;
    for (size_t i = 0; i < f->nmeta; i++)
        if (st_is_version_key(f->meta[i].key, strlen(f->meta[i].key))) vkeys[nv++] = f->meta[i].key;
    qsort(vkeys, nv, sizeof *vkeys, st_cmp_ptr);
    for (size_t i = 0; i < nv && !st; i++) {
        size_t len = strlen(vkeys[i]);
        const char *p = vkeys[i] + 6;
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
        if (!seen) st = st_try_layer(f, p, plen, &fl);
    }
    if (st) goto done;
    *entries = NULL;
    *count = fl.n;
    if (fl.n) {
        size_t total = fl.n * sizeof(bnorm_state_entry);
        for (size_t i = 0; i < fl.n; i++) total += fl.v[i].len + 1;
        bnorm_state_entry *out = (bnorm_state_entry *)malloc(total);
        if (!out) {
            *count = 0;
            st = bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate %zu bytes for the listing", total);
            goto done;
        }
        char *text = (char *)(out + fl.n);
        for (size_t i = 0; i < fl.n; i++) {
            memcpy(text, fl.v[i].prefix, fl.v[i].len);
            text[fl.v[i].len] = '\0';
            out[i].prefix = text;
            out[i].options = fl.v[i].opt;
            out[i].has_options = fl.v[i].has_options;
            text += fl.v[i].len + 1;
        }
        *entries = out;
    }
    bn_clear_error(); /* layers that did not resolve left messages */
done:
    free(fl.v);
    free(vkeys);
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

/* Writes all chunks to fd; the "write" test hook makes one write stop halfway, as a full disk would. */
static int st_write_all(int fd, int *step, const unsigned char *const *chunk, const size_t *len, int nchunks) {
    for (int i = 0; i < nchunks; i++) {
        size_t n = len[i], done = 0;
        int fail = st_inject(step, "write");
        if (fail) n /= 2;
        while (done < n) {
            ssize_t k = write(fd, chunk[i] + done, n - done);
            if (k < 0 && errno == EINTR) continue;
            if (k <= 0) {
                if (k == 0) errno = EIO;
                return -1;
            }
            done += (size_t)k;
        }
        if (fail) {
            errno = EIO;
            return -1;
        }
    }
    return 0;
}

/* A fresh name next to path for the temporary file. */
static void st_tmp_name(char *tmp, size_t cap, const char *path) {
    static atomic_uint counter;
    snprintf(tmp, cap, "%s.tmp-%ld-%u", path, (long)getpid(), atomic_fetch_add(&counter, 1u));
}

/* Writes the chunks to a new file next to path, syncs it and renames it over path, so that path holds
 * the old file or the new one, whole. Where the system has O_TMPFILE (Linux 3.11+, most local file
 * systems) the data goes to an anonymous file in path's directory that gets a name (linkat) only once
 * it is complete and synced, just before the rename: a process killed while writing leaves nothing
 * behind (the window left is the one between linkat and rename). Elsewhere, or when the file system
 * refuses, a named temporary file is created first (O_EXCL) and removed on every error; only a kill
 * can leave it. */
static bnorm_status st_write_atomic(const char *F, const char *path, const unsigned char *const *chunk,
                                    const size_t *len, int nchunks) {
    int step = 0;
    const char *what = "create";
    size_t pl = strlen(path);
    char *tmp = (char *)malloc(pl + 64), *dir = (char *)malloc(pl + 2);
    int fd = -1, err = 0, named = 0; /* named: tmp exists in the directory */
    bnorm_status st = BNORM_STATUS_OK;
    if (!tmp || !dir) {
        free(tmp);
        free(dir);
        return bn_fail(BNORM_STATUS_OUT_OF_MEMORY, F, "cannot allocate file names");
    }
    tmp[0] = '\0';
    const char *slash = strrchr(path, '/');
    if (!slash) strcpy(dir, ".");
    else if (slash == path) strcpy(dir, "/");
    else {
        memcpy(dir, path, (size_t)(slash - path));
        dir[slash - path] = '\0';
    }
    int anon = 0;
    if (st_inject(&step, what)) {
        err = errno;
        st = bn_fail(BNORM_STATUS_IO, F, "%s: cannot create the temporary file: %s (the destination is unchanged)", path,
                     strerror(err));
        goto out;
    }
#ifdef O_TMPFILE
    fd = open(dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0666);
    anon = fd >= 0;
#endif
retry_named:
    if (!anon) {
        for (int tries = 0;; tries++) {
            st_tmp_name(tmp, pl + 64, path);
            fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
            if (fd >= 0 || errno != EEXIST || tries >= 100) break;
        }
        if (fd < 0) {
            err = errno;
            st = bn_fail(BNORM_STATUS_IO, F, "%s: cannot create the temporary file %s: %s (the destination is unchanged)",
                         path, tmp, strerror(err));
            goto out;
        }
        named = 1;
    }
    what = "write";
    if (st_write_all(fd, &step, chunk, len, nchunks) != 0) { err = errno; goto fail; }
    what = "fsync";
    if (st_inject(&step, what) || fsync(fd) != 0) { err = errno; goto fail; }
#ifdef O_TMPFILE
    if (anon) {
        what = "link";
        if (st_inject(&step, what)) { err = errno; goto fail; }
        char proc[64];
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
        int rc = -1;
        for (int tries = 0; tries <= 100; tries++) {
            st_tmp_name(tmp, pl + 64, path);
            rc = linkat(AT_FDCWD, proc, AT_FDCWD, tmp, AT_SYMLINK_FOLLOW);
            if (rc == 0 || errno != EEXIST) break;
        }
        if (rc != 0) { /* no /proc, or a file system that cannot link it: write again, with a name */
            close(fd);
            fd = -1;
            anon = 0;
            goto retry_named;
        }
        named = 1;
    }
#endif
    if (!anon) { /* a named file is closed before the rename; an anonymous one after it (below) */
        what = "close";
        if (st_inject(&step, what)) { err = errno; goto fail; }
        int rc = close(fd);
        fd = -1;
        if (rc != 0) { err = errno; goto fail; }
    }
    what = "rename";
    if (st_inject(&step, what) || rename(tmp, path) != 0) { err = errno; goto fail; }
    /* from here on the destination holds the complete new file. The anonymous file's descriptor is
     * closed only now: nothing but the user-space instructions between linkat and rename is left in
     * which a kill leaves the temporary name behind (a signal that arrives during a system call is
     * delivered when the call returns, so a kill during the rename still completes it). Its data
     * was synced, so a failing close cannot take anything back. */
    if (fd >= 0) {
        what = "close";
        int injected = st_inject(&step, what);
        if (injected) {
            err = errno;
            close(fd);
        } else if (close(fd) != 0) {
            err = errno;
        }
        fd = -1;
        if (err) {
            st = bn_fail(BNORM_STATUS_IO, F, "%s: saved, but close of the synced file failed: %s (the new file is "
                         "complete)", path, strerror(err));
            goto out;
        }
    }
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
    if (fd >= 0) close(fd);
    if (named) unlink(tmp);
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
