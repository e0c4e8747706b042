/*
 * Rebond: one write per commit into SQLite's write-ahead log.
 *
 * SQLite appends a commit's pages to the WAL frame by frame: two write() calls per page (a 24-byte
 * frame header, then the page), then one fsync. A lab result touches ~150 pages of indexes, so a
 * commit made ~300 system calls; on a virtual machine each costs 5-7 us, and together they were most
 * of the time an acknowledgement waited (300 writes + fsync: 2.1 ms; the same bytes in one write +
 * fsync: 0.25 ms, measured on the team's 2-core machine).
 *
 * This VFS ("rebond") wraps the platform's default one and changes two things about WAL files. Writes
 * that follow each other are gathered in memory and written with one call. Durability is untouched:
 *   - xSync writes what is gathered before syncing, so a commit is on disk before SQLite publishes it
 *     (with synchronous=FULL the WAL is synced before the wal-index header names the new frames);
 *   - xShmBarrier on the database writes its WAL's gathered frames before the wal-index header changes,
 *     so no other connection can be told of frames that are not in the file. Its connections must use
 *     synchronous=FULL, as Rebond's all do: a barrier cannot report a failed write, so with NORMAL (no
 *     sync at commit) a write refused there, a full disk say, would let the commit return as done and be
 *     reported only at the next write (seen on a full tmpfs: a commit answered done whose frames were not
 *     written). With FULL the commit's xSync writes the frames first and a failure fails the commit;
 *   - a read, a size, a truncate, a file control or a close of the WAL first writes what is gathered;
 *   - a write that does not follow the gathered ones (a frame rewritten in place) writes them first.
 * A crash loses only frames that no commit had synced: exactly what SQLite itself would lose.
 * And reads copy the frames out of a map of the file instead of making a system call each (wRead, below).
 * Of a database, SQLite's map is kept between read transactions while the file has not grown much (pUnfetch);
 * everything else about it, and every other file (journals, temporary files), is passed through unchanged.
 *
 * It also keeps a list of the databases open through it, with their wal-index while mapped, so that Rebond can
 * read how long a WAL's log is (log_frames): a WAL started over keeps its file, whose size then says nothing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <pthread.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>

#define VFS_NAME "rebond"
/* gathered bytes are written once they reach this size, whatever follows */
#define GATHER_LIMIT (8 * 1024 * 1024)
#define WRITE_PIECE (124 * 1024)
/* a WAL's first bytes mapped for its reads (wRead): Rebond's log stays under 576 MiB (store/sqlite.py WAL_KEPT) */
#define WAL_WINDOW ((sqlite3_int64)1 << 30)

typedef struct RbFile RbFile;
struct RbFile {
    sqlite3_file base;
    sqlite3_file *real;   /* the default VFS's file, stored right after this struct */
    RbFile *wal;          /* on a database: its WAL, while open */
    RbFile *db;           /* on a WAL: its database */
    unsigned char *buf;   /* on a WAL: bytes gathered, for offset start */
    sqlite3_int64 start;
    size_t len, cap;
    int deferred;         /* an error of a write made from xShmBarrier (which cannot report it) */
    sqlite3_int64 gathered, flushes;
    const char *name;     /* on a database: its full path (SQLite keeps it valid until xClose) */
    RbFile *next_db;      /* on a database: the next one open in this process (open_dbs) */
    volatile void *index; /* on a database: its wal-index's first region while mapped (log_frames) */
    sqlite3_int64 mapped_size; /* on a database: its size when SQLite's map of it was last let go (pUnfetch), or -1 */
    const unsigned char *map;  /* on a WAL: WAL_WINDOW bytes of it mapped for reading (map_wal), or NULL */
    sqlite3_int64 readable;    /* on a WAL: the bytes of `map` known to be in the file */
};

static sqlite3_vfs *base_vfs;
static sqlite3_int64 stat_frames_writes, stat_flushes, stat_mapped_reads, stat_maps_kept, stat_maps_let_go;
/* WAL reads through the map (wRead), databases' maps kept (pUnfetch); off to rule them out or measure the other way */
static int map_reads = 1;
/* the databases open through this VFS in this process, for log_frames(); connections open and close in any thread */
static RbFile *open_dbs;
static pthread_mutex_t open_dbs_lock = PTHREAD_MUTEX_INITIALIZER;

static sqlite3_file *R(sqlite3_file *f) { return ((RbFile *)f)->real; }

/* write what is gathered, in pieces the default VFS takes whole (its unix write() caps each call at
 * 128 KiB); on failure it is dropped: SQLite rolls the commit back and never publishes those frames */
static int flush(RbFile *p) {
    int rc = SQLITE_OK;
    for (size_t done = 0; rc == SQLITE_OK && done < p->len; done += WRITE_PIECE) {
        size_t piece = p->len - done < WRITE_PIECE ? p->len - done : WRITE_PIECE;
        rc = p->real->pMethods->xWrite(p->real, p->buf + done, (int)piece, p->start + (sqlite3_int64)done);
    }
    if (rc == SQLITE_OK && p->len && p->start + (sqlite3_int64)p->len > p->readable)
        p->readable = p->start + (sqlite3_int64)p->len;
    if (p->len) {
        p->len = 0;
        __atomic_fetch_add(&stat_flushes, 1, __ATOMIC_RELAXED);
    }
    if (rc == SQLITE_OK && p->deferred) {
        rc = p->deferred;
        p->deferred = 0;
    }
    return rc;
}

/* ---- pass-through methods, shared by every file ---- */

static int pClose(sqlite3_file *f) {
    RbFile *p = (RbFile *)f;
    if (p->wal) p->wal->db = NULL;
    if (p->name) {
        pthread_mutex_lock(&open_dbs_lock);
        for (RbFile **at = &open_dbs; *at; at = &(*at)->next_db)
            if (*at == p) {
                *at = p->next_db;
                break;
            }
        p->index = NULL;
        pthread_mutex_unlock(&open_dbs_lock);
    }
    return p->real->pMethods->xClose(p->real);
}
static int pRead(sqlite3_file *f, void *b, int n, sqlite3_int64 o) { return R(f)->pMethods->xRead(R(f), b, n, o); }
static int pWrite(sqlite3_file *f, const void *b, int n, sqlite3_int64 o) { return R(f)->pMethods->xWrite(R(f), b, n, o); }
static int pTruncate(sqlite3_file *f, sqlite3_int64 s) { return R(f)->pMethods->xTruncate(R(f), s); }
static int pSync(sqlite3_file *f, int fl) { return R(f)->pMethods->xSync(R(f), fl); }
static int pFileSize(sqlite3_file *f, sqlite3_int64 *s) { return R(f)->pMethods->xFileSize(R(f), s); }
static int pLock(sqlite3_file *f, int l) { return R(f)->pMethods->xLock(R(f), l); }
static int pUnlock(sqlite3_file *f, int l) { return R(f)->pMethods->xUnlock(R(f), l); }
static int pCheckReserved(sqlite3_file *f, int *o) { return R(f)->pMethods->xCheckReservedLock(R(f), o); }
static int pFileControl(sqlite3_file *f, int op, void *a) { return R(f)->pMethods->xFileControl(R(f), op, a); }
static int pSectorSize(sqlite3_file *f) { return R(f)->pMethods->xSectorSize(R(f)); }
static int pDeviceChar(sqlite3_file *f) { return R(f)->pMethods->xDeviceCharacteristics(R(f)); }
/* shared memory (version 2) and memory-mapped reads (version 3): passed on when the wrapped file has them */
static int has(sqlite3_file *f, int version) { return R(f)->pMethods->iVersion >= version; }
static int pShmMap(sqlite3_file *f, int i, int sz, int ext, void volatile **pp) {
    if (!has(f, 2))
        return SQLITE_IOERR_SHMMAP;
    int rc = R(f)->pMethods->xShmMap(R(f), i, sz, ext, pp);
    RbFile *p = (RbFile *)f;
    if (rc == SQLITE_OK && i == 0 && *pp && p->name) {
        pthread_mutex_lock(&open_dbs_lock);
        p->index = *pp;
        pthread_mutex_unlock(&open_dbs_lock);
    }
    return rc;
}
static int pShmLock(sqlite3_file *f, int o, int n, int fl) {
    return has(f, 2) ? R(f)->pMethods->xShmLock(R(f), o, n, fl) : SQLITE_IOERR_SHMLOCK;
}
static void pShmBarrier(sqlite3_file *f) {
    RbFile *p = (RbFile *)f;
    if (p->wal && p->wal->len) {
        int rc = flush(p->wal);
        if (rc != SQLITE_OK) p->wal->deferred = rc;
    }
    if (has(f, 2)) p->real->pMethods->xShmBarrier(p->real);
}
static int pShmUnmap(sqlite3_file *f, int del) {
    RbFile *p = (RbFile *)f;
    if (p->name) {  /* forgotten before it is unmapped: log_frames reads it under the same lock */
        pthread_mutex_lock(&open_dbs_lock);
        p->index = NULL;
        pthread_mutex_unlock(&open_dbs_lock);
    }
    return has(f, 2) ? R(f)->pMethods->xShmUnmap(R(f), del) : SQLITE_OK;
}
static int pFetch(sqlite3_file *f, sqlite3_int64 o, int n, void **pp) {
    if (has(f, 3)) return R(f)->pMethods->xFetch(R(f), o, n, pp);
    *pp = NULL;  /* no mapping: SQLite reads the page instead */
    return SQLITE_OK;
}
/* SQLite drops a database's whole map at the start of every read transaction after another connection has
 * committed (xUnfetch with no page), only to map it again at the file's size: every page read after is mapped again,
 * a page fault each, which with the intake writer committing every few milliseconds took 8 % of the server's CPU. The
 * map shows the kernel's cache of the file, every write included: only its size can be out of date. So the map is
 * kept while the file has not grown by MAP_SLACK since the map was last let go, nor got shorter (pages past the map's
 * end are read as without a map). One fstat() a read transaction instead of a munmap() and the faults. */
#define MAP_SLACK ((sqlite3_int64)16 << 20)
static int pUnfetch(sqlite3_file *f, sqlite3_int64 o, void *pp) {
    RbFile *p = (RbFile *)f;
    if (pp == NULL && p->name && map_reads) {
        sqlite3_int64 size;
        if (pFileSize(f, &size) != SQLITE_OK)
            p->mapped_size = -1;
        else if (p->mapped_size >= 0 && size >= p->mapped_size && size - p->mapped_size < MAP_SLACK) {
            __atomic_fetch_add(&stat_maps_kept, 1, __ATOMIC_RELAXED);
            return SQLITE_OK;
        } else
            p->mapped_size = size;
        __atomic_fetch_add(&stat_maps_let_go, 1, __ATOMIC_RELAXED);
    }
    return has(f, 3) ? R(f)->pMethods->xUnfetch(R(f), o, pp) : SQLITE_OK;
}

static const sqlite3_io_methods plain_methods = {
    .iVersion = 3, .xClose = pClose, .xRead = pRead, .xWrite = pWrite, .xTruncate = pTruncate, .xSync = pSync,
    .xFileSize = pFileSize, .xLock = pLock, .xUnlock = pUnlock, .xCheckReservedLock = pCheckReserved,
    .xFileControl = pFileControl, .xSectorSize = pSectorSize, .xDeviceCharacteristics = pDeviceChar,
    .xShmMap = pShmMap, .xShmLock = pShmLock, .xShmBarrier = pShmBarrier, .xShmUnmap = pShmUnmap,
    .xFetch = pFetch, .xUnfetch = pUnfetch,
};

/* ---- the WAL: writes gathered ---- */

static int wClose(sqlite3_file *f) {
    RbFile *p = (RbFile *)f;
    int rc = flush(p);
    if (p->db) p->db->wal = NULL;
    if (p->map) munmap((void *)p->map, (size_t)WAL_WINDOW);
    p->map = NULL;
    int rc2 = p->real->pMethods->xClose(p->real);
    free(p->buf);
    p->buf = NULL;
    return rc != SQLITE_OK ? rc : rc2;
}

/* Reads of the WAL through a map of the file instead of a pread() each.
 *
 * A connection reads a page from the WAL when its latest version is there. After another connection has committed,
 * SQLite empties the reader's page cache: the server's drafts read some 12 pages a lab panel from the WAL, the intake
 * writer (its cache kept small) 5 to 10, and the checkpointer reads every frame it copies. Under the intake's load on
 * the team's 2-core virtual machine a pread() of 2 KiB took 1 to 5 us of CPU; a copy out of a map, 0.3 us.
 *
 * The map is made when SQLite opens the WAL (map_wal) and kept until it closes it: shared and read-only, it is the
 * kernel's cache of the file, and sees every process's writes as soon as they are made. It is made from a descriptor
 * of our own, closed at once: the WAL carries no POSIX lock that closing it could drop (SQLite locks the database
 * and the -shm file, never the WAL).
 *
 * Nothing is read from the map past `readable`, a size the file has had (an fstat, or our own writes): touching a
 * mapped page wholly past the end of a file kills the process (SIGBUS). This rests on how SQLite uses its WAL: the
 * file only gets shorter when the log starts over or is truncated, which SQLite does only when no reader is using any
 * frame of it, and a reader only reads the frames its snapshot counts, which were in the file when it began. A read
 * past `readable` asks the file's size first; one past the size or the window is the wrapped file's own read. */
static const unsigned char *map_wal(const char *name) {
    if (sizeof(void *) < 8)  /* a 32-bit process has no room for the window */
        return NULL;
    int fd = open(name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    void *m = mmap(NULL, (size_t)WAL_WINDOW, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    return m == MAP_FAILED ? NULL : m;
}

static int wRead(sqlite3_file *f, void *b, int n, sqlite3_int64 o) {
    RbFile *p = (RbFile *)f;
    int rc = flush(p);
    if (rc != SQLITE_OK) return rc;
    if (p->map == NULL || !map_reads || o < 0 || o + n > WAL_WINDOW) return pRead(f, b, n, o);
    if (o + n > p->readable) {
        sqlite3_int64 size;
        if (pFileSize(f, &size) != SQLITE_OK) return pRead(f, b, n, o);
        p->readable = size;
        if (o + n > size) return pRead(f, b, n, o);  /* a short read: the wrapped file says so as SQLite expects */
    }
    memcpy(b, p->map + o, (size_t)n);
    __atomic_fetch_add(&stat_mapped_reads, 1, __ATOMIC_RELAXED);
    return SQLITE_OK;
}
static int wWrite(sqlite3_file *f, const void *b, int n, sqlite3_int64 o) {
    RbFile *p = (RbFile *)f;
    size_t amount = (size_t)n;
    int follows = p->len && o == p->start + (sqlite3_int64)p->len;
    if (!follows || p->len + amount > GATHER_LIMIT) {
        int rc = flush(p);
        if (rc != SQLITE_OK) return rc;
        if (amount > GATHER_LIMIT) return pWrite(f, b, n, o);
        p->start = o;
    }
    if (p->len + amount > p->cap) {
        size_t cap = p->cap ? p->cap : 256 * 1024;
        while (cap < p->len + amount) cap *= 2;
        unsigned char *grown = realloc(p->buf, cap);
        if (!grown) {  /* no memory to gather: write as SQLite would have */
            int rc = flush(p);
            return rc != SQLITE_OK ? rc : pWrite(f, b, n, o);
        }
        p->buf = grown;
        p->cap = cap;
    }
    memcpy(p->buf + p->len, b, amount);
    p->len += amount;
    __atomic_fetch_add(&stat_frames_writes, 1, __ATOMIC_RELAXED);
    return SQLITE_OK;
}
static int wTruncate(sqlite3_file *f, sqlite3_int64 s) {
    RbFile *p = (RbFile *)f;
    int rc = flush(p);
    if (rc != SQLITE_OK) return rc;
    if (s < p->readable) p->readable = s;  /* before: no read from the map past the end while it shrinks */
    return pTruncate(f, s);
}
static int wSync(sqlite3_file *f, int fl) {
    int rc = flush((RbFile *)f);
    return rc != SQLITE_OK ? rc : pSync(f, fl);
}
static int wFileSize(sqlite3_file *f, sqlite3_int64 *s) {
    RbFile *p = (RbFile *)f;
    int rc = flush(p);
    if (rc == SQLITE_OK) rc = pFileSize(f, s);
    if (rc == SQLITE_OK) p->readable = *s;
    return rc;
}
static int wFileControl(sqlite3_file *f, int op, void *a) {
    int rc = flush((RbFile *)f);
    return rc != SQLITE_OK ? rc : pFileControl(f, op, a);
}

static const sqlite3_io_methods wal_methods = {
    .iVersion = 3, .xClose = wClose, .xRead = wRead, .xWrite = wWrite, .xTruncate = wTruncate, .xSync = wSync,
    .xFileSize = wFileSize, .xLock = pLock, .xUnlock = pUnlock, .xCheckReservedLock = pCheckReserved,
    .xFileControl = wFileControl, .xSectorSize = pSectorSize, .xDeviceCharacteristics = pDeviceChar,
    .xShmMap = pShmMap, .xShmLock = pShmLock, .xShmBarrier = pShmBarrier, .xShmUnmap = pShmUnmap,
    .xFetch = pFetch, .xUnfetch = pUnfetch,
};

/* ---- the VFS ---- */

static int vOpen(sqlite3_vfs *vfs, const char *name, sqlite3_file *f, int flags, int *out) {
    (void)vfs;
    RbFile *p = (RbFile *)f;
    memset(p, 0, sizeof(*p));
    p->real = (sqlite3_file *)&p[1];
    int rc = base_vfs->xOpen(base_vfs, name, p->real, flags, out);
    if (rc != SQLITE_OK) {
        p->base.pMethods = NULL;
        return rc;
    }
    if ((flags & SQLITE_OPEN_WAL) && name) {
        p->base.pMethods = &wal_methods;
        p->map = map_wal(name);
        sqlite3_file *db = sqlite3_database_file_object(name);
        if (db && db->pMethods == &plain_methods) {
            p->db = (RbFile *)db;
            p->db->wal = p;
        }
    } else {
        p->base.pMethods = &plain_methods;
        if ((flags & SQLITE_OPEN_MAIN_DB) && name) {
            p->name = name;
            p->mapped_size = -1;
            pthread_mutex_lock(&open_dbs_lock);
            p->next_db = open_dbs;
            open_dbs = p;
            pthread_mutex_unlock(&open_dbs_lock);
        }
    }
    return SQLITE_OK;
}
static int vDelete(sqlite3_vfs *v, const char *n, int s) { (void)v; return base_vfs->xDelete(base_vfs, n, s); }
static int vAccess(sqlite3_vfs *v, const char *n, int fl, int *o) { (void)v; return base_vfs->xAccess(base_vfs, n, fl, o); }
static int vFullPathname(sqlite3_vfs *v, const char *n, int sz, char *o) { (void)v; return base_vfs->xFullPathname(base_vfs, n, sz, o); }
static void *vDlOpen(sqlite3_vfs *v, const char *n) { (void)v; return base_vfs->xDlOpen(base_vfs, n); }
static void vDlError(sqlite3_vfs *v, int n, char *o) { (void)v; base_vfs->xDlError(base_vfs, n, o); }
static void (*vDlSym(sqlite3_vfs *v, void *h, const char *s))(void) { (void)v; return base_vfs->xDlSym(base_vfs, h, s); }
static void vDlClose(sqlite3_vfs *v, void *h) { (void)v; base_vfs->xDlClose(base_vfs, h); }
static int vRandomness(sqlite3_vfs *v, int n, char *o) { (void)v; return base_vfs->xRandomness(base_vfs, n, o); }
static int vSleep(sqlite3_vfs *v, int us) { (void)v; return base_vfs->xSleep(base_vfs, us); }
static int vCurrentTime(sqlite3_vfs *v, double *o) { (void)v; return base_vfs->xCurrentTime(base_vfs, o); }
static int vGetLastError(sqlite3_vfs *v, int n, char *o) { (void)v; return base_vfs->xGetLastError(base_vfs, n, o); }
static int vCurrentTimeInt64(sqlite3_vfs *v, sqlite3_int64 *o) { (void)v; return base_vfs->xCurrentTimeInt64(base_vfs, o); }

static sqlite3_vfs rebond_vfs = {
    .iVersion = 2, .zName = VFS_NAME, .xOpen = vOpen, .xDelete = vDelete, .xAccess = vAccess,
    .xFullPathname = vFullPathname, .xDlOpen = vDlOpen, .xDlError = vDlError, .xDlSym = vDlSym, .xDlClose = vDlClose,
    .xRandomness = vRandomness, .xSleep = vSleep, .xCurrentTime = vCurrentTime, .xGetLastError = vGetLastError,
    .xCurrentTimeInt64 = vCurrentTimeInt64,
};

/* ---- the Python module ---- */

static PyObject *py_counts(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L}", "gathered_writes", (long long)stat_frames_writes, "flushes",
                         (long long)stat_flushes, "mapped_reads", (long long)stat_mapped_reads, "maps_kept",
                         (long long)stat_maps_kept, "maps_let_go", (long long)stat_maps_let_go);
}

static PyObject *py_reads_through_map(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyBool_FromLong(__atomic_load_n(&map_reads, __ATOMIC_RELAXED));
}

static PyObject *py_read_through_map(PyObject *self, PyObject *arg) {
    (void)self;
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    int was = __atomic_exchange_n(&map_reads, on, __ATOMIC_RELAXED);
    return PyBool_FromLong(was);
}

/* SQLite counts the memory it holds (sqlite3_memory_used) under a global mutex that every allocation and every
 * free takes: 6 % of the intake writer's instructions (bench/intake_instructions.py, 4.57 against 4.27 M a lab
 * panel). The count can be turned off only while SQLite is not initialised, so this shuts it down and starts it
 * again; that is allowed only when SQLite holds nothing. With the count on, nothing held is exactly
 * sqlite3_memory_used() == 0 once a probe allocation is freed: no connection, statement or blob is open in the
 * process (a closed connection gives everything back). A SQLite built not to count (the probe is not counted) is
 * left alone: then there is nothing to turn off, and no way to know that nothing is held. Call it from a process's
 * only thread, before its first connection: the intake writer does. */
static int memory_count_stopped;

static PyObject *py_stop_counting_memory(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    if (memory_count_stopped)
        Py_RETURN_TRUE;
    void *probe = sqlite3_malloc(64);
    if (probe == NULL)
        Py_RETURN_FALSE;
    sqlite3_int64 counted = sqlite3_memory_used();
    sqlite3_free(probe);
    if (counted == 0) {  /* this SQLite does not count: nothing to turn off */
        memory_count_stopped = 1;
        Py_RETURN_TRUE;
    }
    if (sqlite3_memory_used() != 0)  /* a connection is open: leave SQLite as it is */
        Py_RETURN_FALSE;
    int rc = sqlite3_shutdown();
    if (rc != SQLITE_OK)
        Py_RETURN_FALSE;
    int configured = sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0) == SQLITE_OK;
    rc = sqlite3_initialize();
    if (rc != SQLITE_OK) {
        PyErr_Format(PyExc_RuntimeError, "SQLite could not be initialised again (%d)", rc);
        return NULL;
    }
    memory_count_stopped = configured;
    return PyBool_FromLong(configured);
}

/* The frames in the WAL of the database at `path`, from the wal-index header that every connection to it maps
 * (sqlite.org/walformat.html: 48 bytes, kept twice, the frame count at offset 16; a format every SQLite version
 * sharing a database must read alike). Read from memory a connection of this process has mapped: opening the -shm
 * file to read it and closing it again would drop every POSIX lock this process holds on it, SQLite's among them.
 * None when no connection of this process has it mapped, or while a commit is rewriting it (the copies differ). */
#define INDEX_HEADER 48
#define INDEX_FRAMES 16
#define INDEX_IS_INIT 12

#define NO_SUCH_DATABASE (-2)

/* the frame count of the first database open under exactly this name whose header reads whole; -1 if none reads
 * whole, NO_SUCH_DATABASE if none is open under it */
static long long frames_of(const char *name) {
    long long frames = NO_SUCH_DATABASE;
    unsigned char first[INDEX_HEADER], second[INDEX_HEADER];
    pthread_mutex_lock(&open_dbs_lock);
    for (RbFile *db = open_dbs; db && frames < 0; db = db->next_db) {
        if (db->index == NULL || strcmp(db->name, name) != 0)
            continue;
        frames = -1;
        const volatile unsigned char *index = db->index;
        for (int i = 0; i < INDEX_HEADER; i++) first[i] = index[i];
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        for (int i = 0; i < INDEX_HEADER; i++) second[i] = index[INDEX_HEADER + i];
        if (first[INDEX_IS_INIT] && memcmp(first, second, INDEX_HEADER) == 0) {
            unsigned int count;
            memcpy(&count, first + INDEX_FRAMES, sizeof count);  /* native byte order */
            frames = count;
        }
    }
    pthread_mutex_unlock(&open_dbs_lock);
    return frames;
}

static PyObject *py_log_frames(PyObject *self, PyObject *arg) {
    (void)self;
    PyObject *encoded;
    if (!PyUnicode_FSConverter(arg, &encoded))
        return NULL;
    /* the name SQLite was given is the one it keeps when no link was on its way (a store's connections are opened
     * by absolute path): asked after every commit, it is looked for as it is before being resolved (lstat a part) */
    long long frames = frames_of(PyBytes_AS_STRING(encoded));
    if (frames == NO_SUCH_DATABASE) {
        char *full = PyMem_Malloc((size_t)base_vfs->mxPathname + 1);
        if (full == NULL) {
            Py_DECREF(encoded);
            return PyErr_NoMemory();
        }
        int rc = base_vfs->xFullPathname(base_vfs, PyBytes_AS_STRING(encoded), base_vfs->mxPathname + 1, full);
        if (rc == SQLITE_OK || rc == SQLITE_OK_SYMLINK)
            frames = frames_of(full);
        PyMem_Free(full);
    }
    Py_DECREF(encoded);
    if (frames < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(frames);
}

static PyMethodDef methods[] = {
    {"log_frames", py_log_frames, METH_O,
     "The frames in the WAL of the database at this path, from the wal-index a connection of this process maps; None if none does."},
    {"counts", py_counts, METH_NOARGS, "Writes gathered and written out since the module was loaded."},
    {"read_through_map", py_read_through_map, METH_O,
     "Whether WAL reads go through a map of the file, and databases keep SQLite's map of them between read transactions"
     " (the default), or not; returns the previous setting."},
    {"reads_through_map", py_reads_through_map, METH_NOARGS, "The setting read_through_map sets."},
    {"stop_counting_memory", py_stop_counting_memory, METH_NOARGS,
     "SQLite stops counting the memory it holds (a global mutex on every allocation), if no connection is open yet."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "rebond.store._walvfs",
    .m_doc = "The 'rebond' SQLite VFS: a commit's WAL frames written with few calls (see the C source).",
    .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__walvfs(void) {
    if (sqlite3_vfs_find(VFS_NAME) == NULL) {
        base_vfs = sqlite3_vfs_find(NULL);
        if (base_vfs == NULL || base_vfs->iVersion < 2 || base_vfs->szOsFile < 0) {
            PyErr_SetString(PyExc_ImportError, "SQLite has no default VFS to wrap");
            return NULL;
        }
        rebond_vfs.szOsFile = (int)sizeof(RbFile) + base_vfs->szOsFile;
        rebond_vfs.mxPathname = base_vfs->mxPathname;
        int rc = sqlite3_vfs_register(&rebond_vfs, 0);
        if (rc != SQLITE_OK) {
            PyErr_Format(PyExc_ImportError, "cannot register the SQLite VFS '%s' (%d)", VFS_NAME, rc);
            return NULL;
        }
    }
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "NAME", VFS_NAME) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
