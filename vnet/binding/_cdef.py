"""The subset of libbpf's C API (libbpf >= 1.0, headers bpf/libbpf.h, bpf/bpf.h,
bpf/btf.h) that vnet calls, in cffi ABI-mode syntax.

Struct layouts here must match the real headers: tests/unit/test_cdef_layout.py
compiles them with the C compiler and compares every size and offset.
Functions newer than libbpf 1.0 go in OPTIONAL_SYMBOLS and are probed, not assumed.
"""

CDEF = r"""
typedef int (*libbpf_print_fn_t)(int level, const char *fmt, void *ap);
libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
uint32_t libbpf_major_version(void);
uint32_t libbpf_minor_version(void);
const char *libbpf_version_string(void);
int libbpf_strerror(int err, char *buf, size_t size);
int libbpf_num_possible_cpus(void);
int libbpf_probe_bpf_map_type(int map_type, const void *opts);
int libbpf_probe_bpf_prog_type(int prog_type, const void *opts);
int libbpf_probe_bpf_helper(int prog_type, int helper_id, const void *opts);

struct bpf_object;
struct bpf_program;
struct bpf_map;
struct bpf_link;
struct btf;
struct btf_ext;
struct ring_buffer;

struct bpf_object *bpf_object__open_file(const char *path, const void *opts);
struct bpf_object *bpf_object__open_mem(const void *obj_buf, size_t obj_buf_sz, const void *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
const char *bpf_object__name(const struct bpf_object *obj);
struct btf *bpf_object__btf(const struct bpf_object *obj);
struct bpf_program *bpf_object__next_program(const struct bpf_object *obj, struct bpf_program *prog);
struct bpf_map *bpf_object__next_map(const struct bpf_object *obj, const struct bpf_map *map);
struct bpf_program *bpf_object__find_program_by_name(const struct bpf_object *obj, const char *name);
struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj, const char *name);

const char *bpf_program__name(const struct bpf_program *prog);
const char *bpf_program__section_name(const struct bpf_program *prog);
_Bool bpf_program__autoload(const struct bpf_program *prog);
int bpf_program__set_autoload(struct bpf_program *prog, _Bool autoload);
int bpf_program__fd(const struct bpf_program *prog);
int bpf_program__type(const struct bpf_program *prog);
int bpf_program__set_attach_target(struct bpf_program *prog, int attach_prog_fd, const char *attach_func_name);
struct bpf_link *bpf_program__attach(const struct bpf_program *prog);
struct bpf_link *bpf_program__attach_tracepoint(const struct bpf_program *prog, const char *tp_category, const char *tp_name);
struct bpf_link *bpf_program__attach_raw_tracepoint(const struct bpf_program *prog, const char *tp_name);
struct bpf_link *bpf_program__attach_kprobe(const struct bpf_program *prog, _Bool retprobe, const char *func_name);
struct bpf_link *bpf_program__attach_trace(const struct bpf_program *prog);

int bpf_link__fd(const struct bpf_link *link);
int bpf_link__destroy(struct bpf_link *link);

int bpf_map__fd(const struct bpf_map *map);
const char *bpf_map__name(const struct bpf_map *map);
int bpf_map__type(const struct bpf_map *map);
uint32_t bpf_map__max_entries(const struct bpf_map *map);
int bpf_map__set_max_entries(struct bpf_map *map, uint32_t max_entries);
uint32_t bpf_map__key_size(const struct bpf_map *map);
uint32_t bpf_map__value_size(const struct bpf_map *map);
const void *bpf_map__initial_value(struct bpf_map *map, size_t *psize);
int bpf_map__reuse_fd(struct bpf_map *map, int fd);

int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_map_update_batch(int fd, const void *keys, const void *values, uint32_t *count, const void *opts);
/* A map outside any object (the event rings after the first: one per CPU). */
int bpf_map_create(int map_type, const char *map_name, uint32_t key_size, uint32_t value_size,
                   uint32_t max_entries, const void *opts);
int bpf_link_create(int prog_fd, int target_fd, int attach_type, const void *opts);
/* bpffs: a map kept past its process (the kernel counters of a trace whose agent is killed). */
int bpf_obj_pin(int fd, const char *pathname);
int bpf_obj_get(const char *pathname);

struct bpf_tc_hook {
    size_t sz;
    int ifindex;
    int attach_point;
    uint32_t parent;
};
struct bpf_tc_opts {
    size_t sz;
    int prog_fd;
    uint32_t flags;
    uint32_t prog_id;
    uint32_t handle;
    uint32_t priority;
};
int bpf_tc_hook_create(struct bpf_tc_hook *hook);
int bpf_tc_hook_destroy(struct bpf_tc_hook *hook);
int bpf_tc_attach(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);
int bpf_tc_detach(const struct bpf_tc_hook *hook, const struct bpf_tc_opts *opts);
int bpf_tc_query(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);

struct bpf_test_run_opts {
    size_t sz;
    const void *data_in;
    void *data_out;
    uint32_t data_size_in;
    uint32_t data_size_out;
    const void *ctx_in;
    void *ctx_out;
    uint32_t ctx_size_in;
    uint32_t ctx_size_out;
    uint32_t retval;
    int repeat;
    uint32_t duration;
    uint32_t flags;
    uint32_t cpu;
    uint32_t batch_size;
};
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);

typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
struct ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb, void *ctx, const void *opts);
void ring_buffer__free(struct ring_buffer *rb);
int ring_buffer__poll(struct ring_buffer *rb, int timeout_ms);
int ring_buffer__consume(struct ring_buffer *rb);
int ring_buffer__add(struct ring_buffer *rb, int map_fd, ring_buffer_sample_fn sample_cb, void *ctx);
int ring_buffer__epoll_fd(const struct ring_buffer *rb);

/* BTF: the kernel UAPI records (linux/btf.h) and libbpf's accessors. */
struct btf_type {
    uint32_t name_off;
    uint32_t info;
    uint32_t size_or_type;
};
struct btf_member { uint32_t name_off; uint32_t type; uint32_t offset; };
struct btf_enum { uint32_t name_off; int32_t val; };
struct btf_enum64 { uint32_t name_off; uint32_t val_lo32; uint32_t val_hi32; };
struct btf_array { uint32_t type; uint32_t index_type; uint32_t nelems; };
struct btf_var_secinfo { uint32_t type; uint32_t offset; uint32_t size; };
struct btf *btf__parse(const char *path, struct btf_ext **btf_ext);
struct btf *btf__load_vmlinux_btf(void);
struct btf *btf__load_module_btf(const char *module_name, struct btf *vmlinux_btf);
void btf__free(struct btf *btf);
uint32_t btf__type_cnt(const struct btf *btf);
int32_t btf__find_by_name_kind(const struct btf *btf, const char *type_name, uint32_t kind);
const struct btf_type *btf__type_by_id(const struct btf *btf, uint32_t id);
const char *btf__name_by_offset(const struct btf *btf, uint32_t offset);
int64_t btf__resolve_size(const struct btf *btf, uint32_t type_id);
int btf__resolve_type(const struct btf *btf, uint32_t type_id);

/* Program handlers: vnet's prepare-load callback splices code into relocated
   programs (vnet/binding/splice.py). Instructions travel as opaque bytes. */
struct bpf_prog_load_opts {
    size_t sz;
    int attempts;
    int expected_attach_type;
    uint32_t prog_btf_fd;
    uint32_t prog_flags;
    uint32_t prog_ifindex;
    uint32_t kern_version;
    uint32_t attach_btf_id;
    uint32_t attach_prog_fd;
    uint32_t attach_btf_obj_fd;
    const int *fd_array;
    const void *func_info;
    uint32_t func_info_cnt;
    uint32_t func_info_rec_size;
    const void *line_info;
    uint32_t line_info_cnt;
    uint32_t line_info_rec_size;
    uint32_t log_level;
    uint32_t log_size;
    char *log_buf;  /* newer libbpf appends fields: vnet only reads through libbpf's pointer */
};
typedef int (*libbpf_prog_prepare_load_fn_t)(struct bpf_program *prog, struct bpf_prog_load_opts *opts, long cookie);
struct libbpf_prog_handler_opts {
    size_t sz;
    long cookie;
    void *prog_setup_fn;
    libbpf_prog_prepare_load_fn_t prog_prepare_load_fn;
    void *prog_attach_fn;
};
int libbpf_register_prog_handler(const char *sec, int prog_type, int exp_attach_type,
                                 const struct libbpf_prog_handler_opts *opts);
int libbpf_prog_type_by_name(const char *name, int *prog_type, int *expected_attach_type);
const void *bpf_program__insns(const struct bpf_program *prog);
size_t bpf_program__insn_cnt(const struct bpf_program *prog);
int bpf_program__set_insns(struct bpf_program *prog, void *new_insns, size_t new_insn_cnt);

/* A loaded program's facts (kernel UAPI, linux/bpf.h): what the verifier did
   (verified_insns, Linux >= 5.16; older kernels leave it 0), its size, and the
   run-time statistics kept while BPF_ENABLE_STATS is on. A kernel with a longer
   struct copies only this much; the bit-field is checked like the rest. */
struct bpf_prog_info {
    uint32_t type;
    uint32_t id;
    uint8_t tag[8];
    uint32_t jited_prog_len;
    uint32_t xlated_prog_len;
    uint64_t jited_prog_insns;
    uint64_t xlated_prog_insns;
    uint64_t load_time;
    uint32_t created_by_uid;
    uint32_t nr_map_ids;
    uint64_t map_ids;
    char name[16];
    uint32_t ifindex;
    uint32_t gpl_compatible:1;
    uint32_t :31;
    uint64_t netns_dev;
    uint64_t netns_ino;
    uint32_t nr_jited_ksyms;
    uint32_t nr_jited_func_lens;
    uint64_t jited_ksyms;
    uint64_t jited_func_lens;
    uint32_t btf_id;
    uint32_t func_info_rec_size;
    uint64_t func_info;
    uint32_t nr_func_info;
    uint32_t nr_line_info;
    uint64_t line_info;
    uint64_t jited_line_info;
    uint32_t nr_jited_line_info;
    uint32_t line_info_rec_size;
    uint32_t jited_line_info_rec_size;
    uint32_t nr_prog_tags;
    uint64_t prog_tags;
    uint64_t run_time_ns;
    uint64_t run_cnt;
    uint64_t recursion_misses;
    uint32_t verified_insns;
    uint32_t attach_btf_obj_id;
    uint32_t attach_btf_id;
    uint32_t :32;
};
/* bpf_prog_get_info_by_fd is libbpf 1.2: the generic call is in every 1.x. */
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, uint32_t *info_len);
/* BPF_STATS_RUN_TIME while the returned fd is open (the kernel counts users). */
int bpf_enable_stats(int type);
/* A program from raw instructions (benchmarks: an empty program as the floor). */
int bpf_prog_load(int prog_type, const char *prog_name, const char *license, const void *insns, size_t insn_cnt,
                  struct bpf_prog_load_opts *opts);

/* Newer than libbpf 1.1: declared so they can be called where present. */
struct bpf_link *bpf_program__attach_tcx(const struct bpf_program *prog, int ifindex, const void *opts);
int ring_buffer__consume_n(struct ring_buffer *rb, size_t n);
"""

# Present only in newer libbpf releases: looked up, never assumed.
OPTIONAL_SYMBOLS = (
    "bpf_program__attach_tcx",   # libbpf 1.3
    "ring_buffer__consume_n",    # libbpf 1.5
)

LIBC_CDEF = r"""
/* vasprintf, not vsnprintf into a fixed buffer: libbpf prints a whole verifier
   log (up to megabytes) as one message, and its tail is what matters. */
int vasprintf(char **strp, const char *format, void *ap);
void free(void *ptr);
"""

# libpcap (vnet/binding/pcap.py): <pcap/pcap.h>, checked by test_cdef_layout.py too.
PCAP_CDEF = r"""
typedef struct pcap pcap_t;
struct bpf_insn { unsigned short code; unsigned char jt; unsigned char jf; uint32_t k; };
struct bpf_program { unsigned int bf_len; struct bpf_insn *bf_insns; };
struct timeval { long tv_sec; long tv_usec; };
struct pcap_pkthdr { struct timeval ts; uint32_t caplen; uint32_t len; };
pcap_t *pcap_open_dead(int linktype, int snaplen);
void pcap_close(pcap_t *p);
int pcap_compile(pcap_t *p, struct bpf_program *fp, const char *str, int optimize, uint32_t netmask);
void pcap_freecode(struct bpf_program *fp);
char *pcap_geterr(pcap_t *p);
int pcap_offline_filter(const struct bpf_program *fp, const struct pcap_pkthdr *h, const unsigned char *pkt);
char *bpf_image(const struct bpf_insn *p, int n);
const char *pcap_lib_version(void);
"""

# libcrypto (vnet/binding/crypto.py): GMAC (AES-128-GCM over associated data only) for the
# protocol's session frames. Opaque types only: no layout to check.
CRYPTO_CDEF = r"""
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct engine_st ENGINE;
EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx);
int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr);
const EVP_CIPHER *EVP_aes_128_gcm(void);
int EVP_EncryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, ENGINE *impl,
                       const unsigned char *key, const unsigned char *iv);
int EVP_EncryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl, const unsigned char *in, int inl);
int EVP_EncryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl);
unsigned long OpenSSL_version_num(void);
const char *OpenSSL_version(int type);
"""

# libdeflate (vnet/binding/checksum.py): zlib's CRC-32 with carry-less multiply, for the trace
# files' chunk checks. One function, no types.
DEFLATE_CDEF = r"""
uint32_t libdeflate_crc32(uint32_t crc, const void *buffer, size_t len);
"""
