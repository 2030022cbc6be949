/* midway's optional compiled fast path: the relay of a plain connection.
 *
 * Theory of operation
 * -------------------
 * A relay (midway/core/relay.py) whose two endpoints are plain TCP sockets, with
 * no chain element and no prefix, starts in "C mode": its Relay object (a Python
 * subclass of Core) hands both descriptors to the loop's Engine.  The Engine owns
 * the epoll of the Python poller (poller.py, which uses a dup of it), so the event
 * loop has one reader for every socket midway polls, and a dialled upstream is
 * registered once.  On each wake-up Engine.dispatch takes the ready events, passes
 * those of descriptors it does not relay to the poller in one call, and moves the
 * bytes of its own here, with no Python frame per event: recv into one shared buffer, send it on (up to ROUNDS
 * reads a wake-up), keep what the kernel did not take and stop reading until it
 * drained (at most one read held per direction), pass an EOF on as
 * shutdown(SHUT_WR), and a failure (reset, broken pipe) up to Python.
 *
 * Python is called only at the edges, by method name on the Relay:
 *   _c_half()          the first direction ended (arm the half-close timer);
 *   _c_end()           both ended: every byte delivered, both FINs passed on;
 *   _c_fail(side, e)   errno e on side 0 (client) or 1 (upstream);
 *   _c_bulk(dir)       64 KiB read in direction dir in one wake-up while splice
 *                      is allowed: bulk data, which the Python relay moves with
 *                      splice(2) for less CPU, so it takes over.
 * Anything else (a chain attached, close_after_flush, an admin question about
 * the flows) makes the Relay take the connection back with _c_export(), which
 * returns what each direction still holds; the counters are members read by
 * the Relay (Core.c_*).
 *
 * Errors are never lost (the reason midway polls for itself, see poller.py): an
 * EPOLLERR/EPOLLHUP reaches the reader and the writer of its descriptor, and on a
 * descriptor nobody reads or writes SO_ERROR is read and passed on.  Interest
 * that grows is registered at once; interest that shrinks is dropped when an
 * unwanted event fires.  Events carry the descriptor, looked up in the engine's
 * table (as the poller's dictionary does), so an event fetched for a relay that
 * left earlier in the batch finds nobody, or the new owner of a reused number,
 * never freed memory.  A registered Core holds a reference (the Engine's), and
 * one that leaves during a dispatch stays alive until the batch is done, since
 * the C code that called Python may still be using it.
 *
 * Timestamps come from CLOCK_MONOTONIC (time.monotonic(), the clock of both
 * loops' time()), read once a batch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ACCEL_ABI 3      /* accel.ABI: what this file offers, checked on import */
#define CHUNK 16384     /* bytes per read (HAProxy's default bufsize) */
#define ROUNDS 64       /* reads per wake-up at most: 1 MiB, as splice.py's rounds */
#define BULK 4          /* full reads in a row that make bulk data: relay.READ_SIZE */
#define MAX_EVENTS 200  /* poller.MAX_EVENTS */
#define UNREGISTERED 0xffffffffu
#define WAKE (EPOLLERR | EPOLLHUP)
#define AGAIN(err) ((err) == EAGAIN || (err) == EWOULDBLOCK || (err) == EINTR)

static char shared_buf[CHUNK];
static PyObject *s_half, *s_end, *s_fail, *s_bulk;

typedef struct Engine Engine;

typedef struct {
    int src, dst;        /* read from, write to */
    char reading, eof, fin;
    char *held;          /* bytes dst did not take yet: held[off:len] */
    Py_ssize_t off, len;
    long long nread, delivered;
    double read_at;
} Dir;

typedef struct Core {
    PyObject_HEAD
    Engine *engine;      /* set while the engine relays this connection */
    struct Core *prev, *next;
    Dir d[2];            /* 0: client -> upstream, 1: upstream -> client */
    unsigned mask[2];    /* registered epoll mask of side 0 (client), 1 (upstream) */
    double last_activity;
    int ended, first, splice_ok;
} Core;

struct Engine {
    PyObject_HEAD
    int epfd;
    PyObject *report, *others;
    PyObject *leaving;   /* Cores that left during this dispatch (kept alive) */
    PyObject *stop[3];   /* a KeyboardInterrupt or SystemExit raised in a call */
    int dispatching;
    Py_ssize_t live;
    Core **owner;        /* owner[fd]: the Core relaying descriptor fd, or NULL */
    int owners;          /* length of owner[] */
    Core head;           /* sentinel of the list of registered Cores */
};

/* -- calling Python ------------------------------------------------------ */

static void report(Engine *e, PyObject *where) {
    PyObject *type, *value, *tb;
    if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)
        || PyErr_ExceptionMatches(PyExc_SystemExit)) { /* not for the handler: raised */
        if (e->stop[0] == NULL)
            PyErr_Fetch(&e->stop[0], &e->stop[1], &e->stop[2]);
        PyErr_Clear();
        return;
    }
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL)
        PyException_SetTraceback(value, tb);
    PyObject *r = value == NULL ? NULL
        : PyObject_CallFunctionObjArgs(e->report, value, where, NULL);
    if (r == NULL)
        PyErr_WriteUnraisable(where);
    Py_XDECREF(r);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/* The Relay's method `name` with `argc` (0 to 2) integer arguments. */
static void call(Core *c, PyObject *name, int argc, long a, long b) {
    Engine *e = c->engine;
    Py_INCREF(e);
    PyObject *x = argc > 0 ? PyLong_FromLong(a) : NULL, *y = argc > 1 ? PyLong_FromLong(b) : NULL;
    PyObject *r = (argc > 0 && x == NULL) || (argc > 1 && y == NULL) ? NULL
        : PyObject_CallMethodObjArgs((PyObject *)c, name, x, y, NULL);
    if (r == NULL)
        report(e, (PyObject *)c);
    Py_XDECREF(r);
    Py_XDECREF(x);
    Py_XDECREF(y);
    Py_DECREF(e);
}

#define fail(c, side, err) call((c), s_fail, 2, (side), (err))

/* -- registration --------------------------------------------------------- */

static unsigned wanted(Core *c, int side) {
    return (c->d[side].reading ? EPOLLIN : 0) | (c->d[1 - side].len ? EPOLLOUT : 0);
}

static int ctl(Core *c, int side, unsigned mask) {
    struct epoll_event ev;
    int op = c->mask[side] == UNREGISTERED ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    ev.events = mask;
    ev.data.u64 = (uint64_t)c->d[side].src;
    if (epoll_ctl(c->engine->epfd, op, c->d[side].src, &ev) < 0) {
        fail(c, side, errno);
        return -1;
    }
    c->mask[side] = mask;
    return 0;
}

/* Register interest that grew (at once); narrowing waits for an event. */
static int widen(Core *c, int side) {
    unsigned want = wanted(c, side), have = c->mask[side];
    if (have == UNREGISTERED ? want != 0 : (want & ~have) != 0)
        return ctl(c, side, want | (have == UNREGISTERED ? 0 : have));
    return 0;
}

/* Stop relaying c.  closing: the caller closes both descriptors next, and holds
   the only reference to them, so the kernel drops them from the epoll set itself
   (two system calls saved).  Were one still open elsewhere (a child between fork
   and exec), its registration could only wake the owner of a reused number, for
   a read that would block: events are looked up by descriptor, never by pointer. */
static void leave(Core *c, int closing) {
    Engine *e = c->engine;
    if (e == NULL)
        return;
    for (int side = 0; side < 2; side++) {
        int fd = c->d[side].src;
        if (c->mask[side] != UNREGISTERED && !closing)
            epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, NULL);
        c->mask[side] = UNREGISTERED;
        if (fd >= 0 && fd < e->owners && e->owner[fd] == c)
            e->owner[fd] = NULL;
    }
    c->prev->next = c->next;
    c->next->prev = c->prev;
    c->prev = c->next = NULL;
    c->engine = NULL;
    e->live--;
    /* The engine's reference: kept to the end of the batch when dispatching (if
       the list cannot take it, leaked rather than freed while maybe in use). */
    if (e->dispatching && (e->leaving == NULL || PyList_Append(e->leaving, (PyObject *)c) < 0))
        PyErr_Clear();
    else
        Py_DECREF(c);
}

/* -- moving bytes ----------------------------------------------------------- */

static void drop_held(Dir *d) {
    PyMem_Free(d->held);
    d->held = NULL;
    d->off = d->len = 0;
}

/* Direction i's source sent its FIN: pass it on. */
static void ended(Core *c, int i) {
    Dir *d = &c->d[i];
    d->eof = 1;
    d->reading = 0;
    if (!c->first)
        c->first = i + 1;
    /* If the other direction has ended too, both sockets are closed right away,
       and the close sends this FIN. */
    if (!c->ended)
        shutdown(d->dst, SHUT_WR);
    d->fin = 1;
    c->ended++;
    /* The EOF stays readable: stop asking now (a reset is still reported). */
    if (c->ended < 2 && c->mask[i] != UNREGISTERED && ctl(c, i, wanted(c, i)) < 0)
        return;
    call(c, c->ended == 2 ? s_end : s_half, 0, 0, 0);
}

/* Copy what is ready, CHUNK by CHUNK (fewer bytes per call than the Python relay's
   64 KiB: measured faster, see docs/benchmarks.md), up to ROUNDS times; stop at a
   short read, a full destination (the rest is held) or an end.  BULK full reads in
   one wake-up are bulk data: splice (in Python) takes over where allowed. */
static void on_readable(Core *c, int i, double now) {
    Dir *d = &c->d[i];
    for (int round = 0; round < ROUNDS; round++) {
        ssize_t n = recv(d->src, shared_buf, CHUNK, 0);
        if (n < 0) {
            if (!AGAIN(errno))
                fail(c, i, errno);
            return;
        }
        if (n == 0) {
            ended(c, i);
            return;
        }
        d->nread += n;
        c->last_activity = d->read_at = now;
        ssize_t sent = send(d->dst, shared_buf, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0 && !AGAIN(errno)) {
            fail(c, 1 - i, errno);
            return;
        }
        sent = sent < 0 ? 0 : sent;
        d->delivered += sent;
        if (sent < n) {
            d->held = PyMem_Malloc((size_t)(n - sent));
            if (d->held == NULL) {
                fail(c, 1 - i, ENOMEM);
                return;
            }
            memcpy(d->held, shared_buf + sent, (size_t)(n - sent));
            d->off = 0, d->len = n - sent, d->reading = 0;
            return;
        }
        if (n < CHUNK)
            return;
        if (round == BULK - 1 && c->splice_ok) {
            call(c, s_bulk, 1, i, 0);
            return;
        }
    }
}

static void on_writable(Core *c, int i) {
    Dir *d = &c->d[i];
    ssize_t sent = send(d->dst, d->held + d->off, (size_t)(d->len - d->off),
                        MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent < 0) {
        if (!AGAIN(errno))
            fail(c, 1 - i, errno);
        return;
    }
    d->delivered += sent;
    d->off += sent;
    if (d->off < d->len)
        return;
    drop_held(d);
    d->reading = !d->eof;
}

static void on_event(Core *c, int side, unsigned ev, double now) {
    int called = 0;
    if (c->d[side].reading && (ev & (EPOLLIN | WAKE))) {
        called = 1;
        on_readable(c, side, now);
        if (c->engine == NULL)
            return;
    }
    if (c->d[1 - side].len && (ev & (EPOLLOUT | WAKE))) {
        called = 1;
        on_writable(c, 1 - side);
        if (c->engine == NULL)
            return;
    }
    if (!called && (ev & WAKE)) {
        int err = 0; /* stays 0 if getsockopt fails */
        socklen_t len = sizeof err;
        getsockopt(c->d[side].src, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            fail(c, side, err);
            return;
        }
        /* A hang-up with no error (both ways shut, the EOF not read yet): stop
           polling until someone wants the descriptor again. */
        epoll_ctl(c->engine->epfd, EPOLL_CTL_DEL, c->d[side].src, NULL);
        c->mask[side] = UNREGISTERED;
    } else if (c->mask[side] != UNREGISTERED && (ev & c->mask[side] & ~wanted(c, side)
                                                  & (EPOLLIN | EPOLLOUT))) {
        if (ctl(c, side, wanted(c, side)) < 0)
            return;
    }
    for (int s = 0; s < 2; s++)
        if (c->engine == NULL || widen(c, s) < 0)
            return;
}

/* -- Engine ------------------------------------------------------------------ */

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *names[] = {"report", "others", NULL};
    PyObject *report_cb, *others_cb;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO", names, &report_cb, &others_cb))
        return NULL;
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    if (e == NULL)
        return NULL;
    e->head.prev = e->head.next = &e->head;
    e->leaving = PyList_New(0);
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (e->leaving == NULL || e->epfd < 0) {
        if (e->epfd < 0)
            PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(e);
        return NULL;
    }
    e->report = Py_NewRef(report_cb);
    e->others = Py_NewRef(others_cb);
    return (PyObject *)e;
}

static PyObject *Engine_close(Engine *e, PyObject *unused) {
    while (e->head.next != &e->head)
        leave(e->head.next, 0);
    PyMem_Free(e->owner);
    e->owner = NULL;
    e->owners = 0;
    if (e->epfd >= 0) {
        close(e->epfd);
        e->epfd = -1;
    }
    Py_RETURN_NONE;
}

/* The collector may see a cycle loop -> reader -> engine -> relay -> loop (a loop
   dropped with connections open): traverse the relays, and clear by closing. */
static int Engine_traverse(Engine *e, visitproc visit, void *arg) {
    for (Core *c = e->head.next; c != NULL && c != &e->head; c = c->next)
        Py_VISIT((PyObject *)c);
    Py_VISIT(e->report);
    Py_VISIT(e->others);
    Py_VISIT(e->leaving);
    return 0;
}

static int Engine_clear(Engine *e) {
    Py_XDECREF(Engine_close(e, NULL));
    Py_CLEAR(e->report);
    Py_CLEAR(e->others);
    Py_CLEAR(e->leaving);
    for (int i = 0; i < 3; i++)
        Py_CLEAR(e->stop[i]);
    return 0;
}

static void Engine_dealloc(Engine *e) {
    PyObject_GC_UnTrack(e);
    Engine_clear(e);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

/* Relay what is ready, and pass the events of descriptors no relay here owns to
   `others` (the Python poller sharing this epoll) as [(fd, events)].  Such an
   event lost to a failure is no loss: the epoll is level-triggered. */
static PyObject *Engine_dispatch(Engine *e, PyObject *unused) {
    struct epoll_event evs[MAX_EVENTS];
    int n = epoll_wait(e->epfd, evs, MAX_EVENTS, 0);
    if (n <= 0)
        Py_RETURN_NONE; /* EINTR: the loop calls again; EBADF: closed */
    PyObject *rest = NULL;
    struct timespec ts; /* CLOCK_MONOTONIC: time.monotonic(), both loops' clock */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double now = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    Py_INCREF(e);
    e->dispatching = 1;
    for (int k = 0; k < n; k++) {
        int fd = (int)evs[k].data.u64;
        Core *c = fd < e->owners ? e->owner[fd] : NULL;
        if (c != NULL) { /* NULL: Python's, or its relay left earlier in this batch */
            on_event(c, c->d[0].src == fd ? 0 : 1, evs[k].events, now);
            continue;
        }
        PyObject *item = Py_BuildValue("(iI)", fd, evs[k].events);
        if (rest == NULL)
            rest = PyList_New(0);
        if (item == NULL || rest == NULL || PyList_Append(rest, item) < 0)
            PyErr_Clear();
        Py_XDECREF(item);
    }
    e->dispatching = 0;
    int failed = e->leaving == NULL ? 0 : PyList_SetSlice(e->leaving, 0, PY_SSIZE_T_MAX, NULL);
    if (e->stop[0] != NULL) {
        PyErr_Restore(e->stop[0], e->stop[1], e->stop[2]);
        e->stop[0] = e->stop[1] = e->stop[2] = NULL;
        failed = -1;
    }
    if (rest != NULL) {
        PyObject *r = failed < 0 ? NULL : PyObject_CallOneArg(e->others, rest);
        failed = r == NULL ? -1 : failed; /* the poller reports all but a stop */
        Py_XDECREF(r);
        Py_DECREF(rest);
    }
    Py_DECREF(e);
    if (failed < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef Engine_methods[] = {
    {"dispatch", (PyCFunction)Engine_dispatch, METH_NOARGS,
     "Relay what is ready; pass the other descriptors' events to others()."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "Drop every connection; close."},
    {NULL}
};

static PyMemberDef Engine_members[] = {
    {"epfd", T_INT, offsetof(Engine, epfd), READONLY, "The epoll descriptor (-1: closed)."},
    {"live", T_PYSSIZET, offsetof(Engine, live), READONLY, "Relays in C mode now."},
    {NULL}
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "midway.core._accel.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Engine(report, others): one epoll relaying plain connections in C.",
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_traverse = (traverseproc)Engine_traverse,
    .tp_clear = (inquiry)Engine_clear,
    .tp_methods = Engine_methods,
    .tp_members = Engine_members,
};

/* -- Core -------------------------------------------------------------------- */

static PyObject *Core_c_start(Core *c, PyObject *args) {
    Engine *e;
    int cfd, ufd, splice_ok, had[2] = {-1, -1};
    double now;
    if (!PyArg_ParseTuple(args, "O!iipd|ii", &EngineType, &e, &cfd, &ufd, &splice_ok, &now,
                          &had[0], &had[1]))
        return NULL;
    if (c->engine != NULL || e->epfd < 0 || cfd < 0 || ufd < 0 || cfd == ufd) {
        PyErr_SetString(PyExc_RuntimeError, "relay already started, engine closed, or bad fds");
        return NULL;
    }
    int top = cfd > ufd ? cfd : ufd;
    if (top >= e->owners) {
        int size = top + 1 > 2 * e->owners ? top + 1 : 2 * e->owners;
        Core **owner = PyMem_Realloc(e->owner, (size_t)size * sizeof *owner);
        if (owner == NULL)
            return PyErr_NoMemory();
        memset(owner + e->owners, 0, (size_t)(size - e->owners) * sizeof *owner);
        e->owner = owner;
        e->owners = size;
    }
    memset(c->d, 0, sizeof c->d);
    c->d[0].src = c->d[1].dst = cfd;
    c->d[1].src = c->d[0].dst = ufd;
    c->d[0].reading = c->d[1].reading = 1;
    c->mask[0] = c->mask[1] = UNREGISTERED;
    c->last_activity = now;
    c->ended = c->first = 0;
    c->splice_ok = splice_ok;
    for (int side = 0; side < 2; side++) { /* had: registered by the Python poller */
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)c->d[side].src};
        int op = had[side] < 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
        if (had[side] != EPOLLIN && epoll_ctl(e->epfd, op, c->d[side].src, &ev) < 0) {
            PyErr_SetFromErrno(PyExc_OSError); /* Python relays it then: from nothing */
            epoll_ctl(e->epfd, EPOLL_CTL_DEL, cfd, NULL);
            epoll_ctl(e->epfd, EPOLL_CTL_DEL, ufd, NULL);
            return NULL;
        }
        c->mask[side] = EPOLLIN;
    }
    Py_INCREF(c); /* the engine's, until leave() */
    c->engine = e;
    e->owner[cfd] = e->owner[ufd] = c;
    c->prev = e->head.prev;
    c->next = &e->head;
    e->head.prev->next = c;
    e->head.prev = c;
    e->live++;
    Py_RETURN_NONE;
}

static PyObject *Core_c_leave(Core *c, PyObject *args) {
    int closing = 0;
    if (!PyArg_ParseTuple(args, "|p", &closing))
        return NULL;
    leave(c, closing);
    Py_RETURN_NONE;
}

/* Leave the engine and return what each direction still holds: (up, down). */
static PyObject *Core_c_export(Core *c, PyObject *unused) {
    leave(c, 0);
    Dir *up = &c->d[0], *down = &c->d[1];
    PyObject *r = Py_BuildValue("(y#y#)", up->held ? up->held + up->off : "", up->len - up->off,
                                down->held ? down->held + down->off : "", down->len - down->off);
    for (int i = 0; r != NULL && i < 2; i++)
        drop_held(&c->d[i]);
    return r;
}

static void Core_dealloc(Core *c) {
    /* A registered Core is referenced by its engine: it cannot get here. */
    for (int i = 0; i < 2; i++)
        PyMem_Free(c->d[i].held);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *Core_held(Core *c, void *dir) {
    Dir *d = &c->d[(intptr_t)dir];
    return PyLong_FromSsize_t(d->len - d->off);
}

static PyGetSetDef Core_getset[] = {
    {"c_up_held", (getter)Core_held, NULL, "Client bytes the upstream has not taken.", (void *)0},
    {"c_down_held", (getter)Core_held, NULL, "Upstream bytes the client has not taken.", (void *)1},
    {NULL}
};

#define DIR_MEMBERS(name, i)                                                        \
    {"c_" name "_read", T_LONGLONG, offsetof(Core, d[i].nread), 0, NULL},           \
    {"c_" name "_delivered", T_LONGLONG, offsetof(Core, d[i].delivered), 0, NULL},  \
    {"c_" name "_read_at", T_DOUBLE, offsetof(Core, d[i].read_at), READONLY, NULL}, \
    {"c_" name "_eof", T_BOOL, offsetof(Core, d[i].eof), READONLY, NULL},           \
    {"c_" name "_fin", T_BOOL, offsetof(Core, d[i].fin), READONLY, NULL}

static PyMemberDef Core_members[] = {
    DIR_MEMBERS("up", 0),
    DIR_MEMBERS("down", 1),
    {"c_engine", T_OBJECT, offsetof(Core, engine), READONLY, "The engine relaying it, or None."},
    {"c_last_activity", T_DOUBLE, offsetof(Core, last_activity), READONLY, NULL},
    {"c_ended", T_INT, offsetof(Core, ended), READONLY, NULL},
    {"c_first", T_INT, offsetof(Core, first), READONLY, "0, or 1 + the side that ended first."},
    {"c_splice_ok", T_INT, offsetof(Core, splice_ok), 0, NULL},
    {NULL}
};

static PyMethodDef Core_methods[] = {
    {"_c_start", (PyCFunction)Core_c_start, METH_VARARGS,
     "_c_start(engine, client_fd, upstream_fd, splice_ok, now, client_mask=-1, "
     "upstream_mask=-1): relay in C (a mask: what the fd is registered for already)."},
    {"_c_leave", (PyCFunction)Core_c_leave, METH_VARARGS,
     "_c_leave(closing=False): stop relaying (closing: the caller closes both fds next)."},
    {"_c_export", (PyCFunction)Core_c_export, METH_NOARGS,
     "Stop relaying; return the bytes held (up, down) for Python to deliver."},
    {NULL}
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "midway.core._accel.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The C part of a Relay (see midway/core/relay.py).",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_members = Core_members,
    .tp_getset = Core_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "midway.core._accel",
    "midway's optional compiled relay of plain connections (see _accel.c).", -1, NULL
};

PyMODINIT_FUNC PyInit__accel(void) {
    s_half = PyUnicode_InternFromString("_c_half");
    s_end = PyUnicode_InternFromString("_c_end");
    s_fail = PyUnicode_InternFromString("_c_fail");
    s_bulk = PyUnicode_InternFromString("_c_bulk");
    if (!s_half || !s_end || !s_fail || !s_bulk)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "ABI", ACCEL_ABI) < 0
        || PyModule_AddType(m, &EngineType) < 0 || PyModule_AddType(m, &CoreType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
