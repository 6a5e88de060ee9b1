//! The kernel half of spliced's sockmap data plane.
//!
//! * `splice_verdict` (sk_skb stream verdict) runs for every skb that arrives on a
//!   socket in `SPLICED` and sends it out of the peer socket of the same tunnel.
//! * `flow_state` (sock_ops) reports TCP state changes of tunnel sockets (EOF,
//!   close, reset) with the byte counters to user space over `FLOW_EVENTS`.
//!
//! User space owns the tunnel lifecycle; these programs only move and count bytes.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd is the only atomic add the bpfel target lowers"
)]

mod packet;

use aya_ebpf::{
    bindings::{
        __sk_buff,
        sk_action::{SK_DROP, SK_PASS},
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{bpf_get_socket_cookie, bpf_loop, bpf_skb_adjust_room},
    macros::{map, sock_ops, stream_verdict},
    maps::{Array, HashMap, RingBuf, SockHash},
    programs::{SkBuffContext, SockOpsContext},
    EbpfContext as _,
};
use aya_log_ebpf::{debug, warn};
use proxy_common::{
    flow_flags, flow_mode, stat, tcp_state, FlowControl, FlowEntry, FlowEvent, FlowEventKind,
    PROGRESS_EVERY_BYTES,
};

/// Upper bound on spliced sockets (two per tunnel); user space may lower it at load.
const MAX_SOCKETS: u32 = 131_072;

/// Both sockets of every tunnel, keyed by socket cookie. No program is attached:
/// it is only the redirect target, so a socket is a valid target before its own
/// verdict starts running (insertion order, see `dataplane/sockmap.rs`).
#[map]
static REDIRECT_TARGETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Both sockets of every tunnel, keyed by socket cookie; `splice_verdict` is
/// attached here, so inserting a socket makes the kernel run it on every skb.
#[map]
static SPLICED: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Per-socket tunnel state: the peer's cookie and the bytes redirected so far.
#[map]
static FLOWS: HashMap<u64, FlowEntry> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Directions user space holds back (flow control), keyed by the source
/// socket's cookie; see `proxy_common::FlowControl`.
#[map]
static FLOW_CONTROL: HashMap<u64, FlowControl> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Flow events for user space (TCP state changes of tunnel sockets).
#[map]
static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Test hook, set by user space at load time (`--test-hook redirect-empty-skbs`):
/// when non-zero the verdict redirects empty FIN skbs instead of dropping them, so
/// a test can show that dropping them is what keeps half-closed tunnels intact.
#[cfg(feature = "test-hooks")]
#[no_mangle]
static REDIRECT_EMPTY_SKBS: u8 = 0;

/// Test hook, set by user space at load time: zero (`--test-hook
/// no-overlap-trim`) lets skbs that repeat handled bytes through whole, so a
/// test can show that trimming them is what keeps the stream exact.
#[cfg(feature = "test-hooks")]
#[no_mangle]
static TRIM_OVERLAPS: u8 = 1;

/// Test hook, set by user space at load time (`--test-hook short-trim`): the
/// most trim steps per skb, below [`MAX_TRIM_STEPS`], so a test can reach the
/// reset that follows an overlap too long to trim.
#[cfg(feature = "test-hooks")]
#[no_mangle]
static TRIM_STEPS: u32 = MAX_TRIM_STEPS;

/// Whether empty FIN skbs are redirected: only under a test hook.
#[inline(always)]
fn redirect_empty_skbs() -> bool {
    #[cfg(feature = "test-hooks")]
    {
        // SAFETY: a read of a constant in .rodata that the loader may have patched.
        let value = unsafe { core::ptr::read_volatile(&REDIRECT_EMPTY_SKBS) };
        value != 0
    }
    #[cfg(not(feature = "test-hooks"))]
    {
        false
    }
}

/// Whether overlaps are trimmed: always, except under a test hook.
#[inline(always)]
fn trim_overlaps() -> bool {
    #[cfg(feature = "test-hooks")]
    {
        // SAFETY: a read of a constant in .rodata that the loader may have patched.
        let value = unsafe { core::ptr::read_volatile(&TRIM_OVERLAPS) };
        value != 0
    }
    #[cfg(not(feature = "test-hooks"))]
    {
        true
    }
}

/// The most trim steps per skb: [`MAX_TRIM_STEPS`], except under a test hook.
#[inline(always)]
fn trim_steps() -> u32 {
    #[cfg(feature = "test-hooks")]
    {
        // SAFETY: a read of a constant in .rodata that the loader may have patched.
        unsafe { core::ptr::read_volatile(&TRIM_STEPS) }
    }
    #[cfg(not(feature = "test-hooks"))]
    {
        MAX_TRIM_STEPS
    }
}

/// Kernel-side counters, indexed by `proxy_common::stat`.
#[map]
static STATS: Array<u64> = Array::with_max_entries(stat::COUNT, 0);

/// Atomically adds `value` to `*counter` and returns the previous value.
#[inline(always)]
fn add(counter: *mut u64, value: u64) -> u64 {
    // SAFETY: `counter` points into a map value, which the kernel keeps alive for
    // the whole program run; the add is atomic (BPF_ATOMIC | BPF_ADD | BPF_FETCH)
    // because user space and other CPUs may read the counter concurrently.
    // SeqCst, not Relaxed: for a relaxed atomicrmw LLVM's BPF backend emits the
    // legacy BPF_ADD without BPF_FETCH even when the result is used, and reads
    // back the operand register instead of the old value.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::SeqCst }>(
            counter, value,
        )
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        add(counter, 1);
    }
}

#[stream_verdict]
pub fn splice_verdict(ctx: SkBuffContext) -> u32 {
    let len = ctx.len();
    if len == 0 && !redirect_empty_skbs() {
        // A FIN without payload reaches the verdict as an empty skb. TCP has already
        // recorded the FIN on this socket; redirecting the empty skb makes the peer's
        // send path fail with EPIPE and cut the stream, so it is dropped here and user
        // space propagates the EOF with shutdown(2) once the data has drained.
        count(stat::ZERO_LENGTH_DROPPED);
        return SK_DROP;
    }
    // SAFETY: the context is a valid __sk_buff for the whole program run.
    // bpf_get_socket_cookie returns the socket's unique, never-reused 64-bit id.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(entry) = FLOWS.get_ptr_mut(cookie) else {
        // Not (or no longer) a tunnel socket: let the bytes reach its own queue.
        count(stat::NO_FLOW);
        return SK_PASS;
    };
    // SAFETY: `entry` is a live map value (see `add`); only this socket's
    // verdict writes `flags`.
    if unsafe { (*entry).flags } & flow_flags::BROKEN != 0 {
        return SK_DROP;
    }
    // SAFETY: as above.
    let Some(trimmed_len) = (unsafe { trim_handled_bytes(&ctx, entry, len) }) else {
        // Repeated bytes left in the skb: forwarding it would corrupt the
        // stream, dropping it loses new bytes. From here on the direction
        // forwards nothing, and user space resets the tunnel.
        // SAFETY: as above.
        unsafe { (*entry).flags |= flow_flags::BROKEN };
        count(stat::TRIM_FAILED);
        // aya-log: the record goes to the AYA_LOGS ring buffer, which user
        // space drains into its logger; AYA_LOG_LEVEL (set at load from the
        // process's log level) skips it when warnings are off.
        warn!(
            &ctx,
            "socket {}: a retransmission repeats more bytes than can be trimmed; the tunnel will be reset",
            cookie
        );
        report(cookie, FlowEventKind::OverlapNotTrimmed, 0);
        return SK_DROP;
    };
    if trimmed_len == 0 && len != 0 {
        // Nothing new in this skb. Dropping it once empty leaves copied_seq
        // alone (tcp_eat_skb returns early for skb->len == 0).
        return SK_DROP;
    }
    let len = trimmed_len;
    if let Some(control) = FLOW_CONTROL.get_ptr_mut(cookie) {
        // SAFETY: `entry` and `control` are live map values (see `add`).
        if unsafe { hold_back(entry, control) } {
            // SAFETY: see `add`.
            unsafe {
                add(&raw mut (*entry).bytes_passed, u64::from(len));
                report_if_drained(entry, cookie);
            }
            // SK_PASS without a redirect queues the skb on this socket's psock
            // (sk_psock_skb_ingress_self), charged to its receive buffer.
            return SK_PASS;
        }
    }
    // SAFETY: `entry` is a live map value (see `add`).
    let mut peer = unsafe { (*entry).peer_cookie };
    // bpf_sk_redirect_hash looks the peer up in REDIRECT_TARGETS and, with flags 0,
    // queues the skb on the peer's psock for *egress*: a kernel worker
    // (sk_psock_backlog) sends it out of the peer socket. It returns SK_PASS when
    // the peer was found, SK_DROP otherwise.
    let verdict = REDIRECT_TARGETS.redirect_skb(&ctx, &mut peer, 0) as u32;
    if verdict == SK_PASS {
        // SAFETY: see `add`.
        let before = add(
            unsafe { &raw mut (*entry).bytes_redirected },
            u64::from(len),
        );
        let after = before + u64::from(len);
        // The redirect path has no backpressure of its own (the queued skbs are
        // not charged to either socket's buffers), so user space watches each
        // direction's backlog and pauses it; it learns of progress from here.
        if before / PROGRESS_EVERY_BYTES != after / PROGRESS_EVERY_BYTES {
            report(cookie, FlowEventKind::Progress, after);
        }
        // SAFETY: `entry` is a live map value.
        unsafe { report_if_drained(entry, cookie) };
    } else {
        count(stat::REDIRECT_FAILED);
        debug!(
            &ctx,
            "socket {}: no peer socket {} to redirect to", cookie, peer
        );
    }
    verdict
}

/// How many payload bytes one `bpf_skb_adjust_room` call may trim
/// (sk_skb_adjust_room rejects more than 0xfff).
const TRIM_STEP: u32 = 0xfff;
/// Trim steps per skb: overlaps up to 2 MiB, more than an skb TCP queues
/// carries (a coalesced receive-queue skb holds at most MAX_SKB_FRAGS page
/// fragments); 32 steps (128 KiB) cover two loopback segments only.
const MAX_TRIM_STEPS: u32 = 512;

/// Trims off the front of the skb the bytes the verdict handled already and
/// returns the skb's new length, or `None` if repeated bytes are left.
///
/// TCP queues a segment that overlaps received data — a retransmission that
/// starts before `rcv_nxt`, or an out-of-order segment merged after the gap
/// filled — without trimming it (tcp_data_queue's "partial packet" case,
/// tcp_ofo_queue): tcp_recvmsg skips the overlap using copied_seq, but
/// tcp_read_skb hands the verdict the whole skb (since commit 9b7177b1df64,
/// "bpf: tcp_read_skb needs to pop skb regardless of seq", 6.6: "tcp_read_skb()
/// reads entire skbs so there is no need to handle the 'offset!=0' case").
/// Redirected or passed whole, the overlap reaches the peer twice. Seen here
/// as 130,966 repeated bytes (two loopback segments) in a 200 MiB transfer
/// whose receiver paused, about one run in ten under load.
///
/// # Safety
/// `entry` must point to a live `FLOWS` value.
#[inline(always)]
unsafe fn trim_handled_bytes(ctx: &SkBuffContext, entry: *mut FlowEntry, len: u32) -> Option<u32> {
    // For sk_skb programs cb[0] reads the first word of skb->cb (struct
    // sk_skb_cb's data, at offset 0), which for a TCP skb is
    // TCP_SKB_CB(skb)->seq: the sequence number of its first payload byte.
    let seq = ctx.cb()[0];
    if len == 0 || !trim_overlaps() {
        return Some(len);
    }
    // SAFETY: guaranteed by the caller; only this socket's verdict touches
    // these fields, and it runs for one skb at a time (under the socket lock).
    let (flags, next) = unsafe { ((*entry).flags, (*entry).next_seq) };
    let end = seq.wrapping_add(len);
    if flags & flow_flags::SEQ_KNOWN == 0 {
        // SAFETY: as above.
        unsafe {
            (*entry).flags = flags | flow_flags::SEQ_KNOWN;
            (*entry).next_seq = end;
        }
        return Some(len);
    }
    let overlap = next.wrapping_sub(seq) as i32;
    if overlap < 0 {
        count(stat::SEQUENCE_GAPS);
    }
    if (end.wrapping_sub(next) as i32) > 0 {
        // SAFETY: as above.
        unsafe { (*entry).next_seq = end };
    }
    if overlap <= 0 {
        return Some(len);
    }
    let overlap = (overlap as u32).min(len);
    (trim_front(ctx.skb.skb, overlap, trim_steps()) == TRIMMED).then(|| ctx.len())
}

/// What [`trim_front`] returns when every byte asked for was trimmed.
const TRIMMED: u32 = 0;

/// Drops `bytes` from the front of the skb, in at most `steps` calls of
/// `bpf_skb_adjust_room`, and counts them; returns [`TRIMMED`], or 1 if bytes
/// are left.
///
/// The steps run as a `bpf_loop` callback, which the verifier checks once
/// whatever the number of iterations. As a bounded loop it walked every
/// iteration: with the loop inlined, 256 steps already made the program too
/// complex to load under one test hook (E2BIG), and 512 steps in a function
/// of their own passed or failed by how LLVM laid the loop out — the release
/// build's layout hit the 1,000,000-instruction budget after ~22 s. A function
/// of its own that returns one of two values, so the verifier walks the rest
/// of the verdict twice after it.
#[inline(never)]
fn trim_front(skb: *mut __sk_buff, bytes: u32, steps: u32) -> u32 {
    let mut trim = Trim { skb, left: bytes };
    // SAFETY: `trim_step` has the callback signature bpf_loop expects and only
    // touches the `Trim` passed as its context, which lives on this stack for
    // the whole call. bpf_loop calls it up to `steps` times (at most
    // MAX_TRIM_STEPS: the kernel refuses more than 1 << 23), stopping early
    // when it returns 1.
    unsafe {
        bpf_loop(
            steps.min(MAX_TRIM_STEPS),
            trim_step as *const () as *mut core::ffi::c_void,
            (&raw mut trim).cast(),
            0,
        );
    }
    let left = trim.left;
    if let Some(counter) = STATS.get_ptr_mut(stat::DUPLICATE_BYTES_TRIMMED) {
        add(counter, u64::from(bytes - left));
    }
    if let Some(longest) = STATS.get_ptr_mut(stat::LONGEST_OVERLAP) {
        // SAFETY: a live map value (see `add`). Not atomic: two CPUs may race
        // and keep the smaller value, which is fine for a diagnostic.
        unsafe {
            if u64::from(bytes) > *longest {
                *longest = u64::from(bytes);
            }
        }
    }
    u32::from(left != 0)
}

/// The state of a trim, on the stack of [`trim_front`].
#[repr(C)]
struct Trim {
    /// The program's context.
    skb: *mut __sk_buff,
    /// Bytes still to trim off the front.
    left: u32,
}

/// One step of [`trim_front`]: trims up to [`TRIM_STEP`] bytes; returns 1 to
/// stop (done, or the helper failed).
extern "C" fn trim_step(_index: u64, context: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `trim_front` gave it: a live,
    // exclusively used Trim.
    let trim = unsafe { &mut *context.cast::<Trim>() };
    if trim.left == 0 {
        return 1;
    }
    let step = trim.left.min(TRIM_STEP);
    // SAFETY: `trim.skb` is the program's context. bpf_skb_adjust_room with a
    // negative length on an sk_skb pulls that many bytes into the linear
    // area and drops them from the front (sk_skb_adjust_room →
    // pskb_may_pull + __skb_pull); it fails if the skb is shorter or the
    // pull cannot allocate.
    if unsafe { bpf_skb_adjust_room(trim.skb, -(step as i32), 0, 0) } != 0 {
        return 1;
    }
    trim.left -= step;
    0
}

/// Whether flow control holds this skb back (pass) rather than redirecting it.
///
/// While `RESUMING`, the verdict passes until user space has copied every byte
/// it passed before, then switches to `REDIRECT`: user space wrote those bytes
/// into the peer's send queue already, so the redirected skb (sent later by the
/// peer's psock worker) lands behind them. The verdict runs for one socket at a
/// time (tcp_read_skb under the socket lock), so `bytes_passed` cannot change
/// between the comparison and the switch.
///
/// # Safety
/// `entry` and `control` must point to live `FLOWS` and `FLOW_CONTROL` values.
#[inline(always)]
unsafe fn hold_back(entry: *mut FlowEntry, control: *mut FlowControl) -> bool {
    // SAFETY: guaranteed by the caller. User space replaces the whole value
    // (a new element, RCU-freed), so these are plain reads of a stable copy.
    let mode = unsafe { core::ptr::read_volatile(&raw const (*control).mode) };
    if mode == flow_mode::REDIRECT {
        return false;
    }
    if mode != flow_mode::RESUMING {
        return true;
    }
    // SAFETY: as above; adding 0 is an ordered atomic read.
    let (copied, passed) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*control).bytes_copied),
            add(&raw mut (*entry).bytes_passed, 0),
        )
    };
    if copied != passed {
        return true;
    }
    // SAFETY: as above. If user space replaced the value meanwhile, its copy
    // still says RESUMING with the same count and the next skb switches again.
    unsafe { core::ptr::write_volatile(&raw mut (*control).mode, flow_mode::REDIRECT) };
    false
}

#[sock_ops]
pub fn flow_state(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // Ask the kernel to call us on every later TCP state change of this
            // socket (tcp_set_state → BPF_SOCK_OPS_STATE_CB). Which sockets belong
            // to a tunnel is only known later, so every socket of the cgroup asks;
            // the callback returns at once for the others.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_STATE_CB => report_state_change(&ctx),
        _ => {}
    }
    1
}

/// Sends the `Drained` event once the handled (redirected + passed) count
/// reaches the EOF target.
///
/// Called by the verdict after adding to `bytes_redirected` and by sock_ops after
/// setting `eof_target_plus_one`. They can run at once on two CPUs, so each side
/// publishes its own write with a fully ordered atomic before reading the other's
/// (atomic fetch-adds are full barriers): at least one of them sees both values,
/// and the `drained_reported` fetch-add lets exactly one of them report.
///
/// # Safety
/// `entry` must point to a live `FLOWS` value.
#[inline(always)]
unsafe fn report_if_drained(entry: *mut FlowEntry, cookie: u64) {
    // SAFETY: guaranteed by the caller; adding 0 is an ordered atomic read.
    let (target_plus_one, handled) = unsafe {
        (
            add(&raw mut (*entry).eof_target_plus_one, 0),
            add(&raw mut (*entry).bytes_redirected, 0) + add(&raw mut (*entry).bytes_passed, 0),
        )
    };
    if target_plus_one == 0 || handled < target_plus_one - 1 {
        return;
    }
    // SAFETY: as above.
    if unsafe { add(&raw mut (*entry).drained_reported, 1) } != 0 {
        return;
    }
    report(cookie, FlowEventKind::Drained, handled);
}

/// Sends a `kind` event for socket `cookie` that carries no TCP states.
#[inline(always)]
fn report(cookie: u64, kind: FlowEventKind, bytes_redirected: u64) {
    output(&FlowEvent {
        cookie,
        bytes_redirected,
        kind: kind as u32,
        old_state: 0,
        new_state: 0,
        _pad: 0,
    });
}

#[inline(always)]
fn output(event: &FlowEvent) {
    // bpf_ringbuf_output copies the event into the ring buffer and wakes the
    // user-space poller; it fails only when the buffer is full.
    if FLOW_EVENTS.output::<FlowEvent>(event, 0).is_err() {
        count(stat::EVENTS_LOST);
    }
}

/// Whether a transition `old → new` is the arrival of the peer's FIN. From
/// FIN_WAIT2 the FIN goes straight to TCP_CLOSE (tcp_fin → tcp_time_wait →
/// tcp_done); a reset takes the same path, and then the target computed from
/// `bytes_received` is already reached, which is also right: nothing more comes.
#[inline(always)]
fn is_fin_arrival(old: u32, new: u32) -> bool {
    matches!(
        (old, new),
        (tcp_state::ESTABLISHED, tcp_state::CLOSE_WAIT)
            | (tcp_state::FIN_WAIT1, tcp_state::CLOSING)
            | (tcp_state::FIN_WAIT2, tcp_state::CLOSE)
    )
}

#[inline(always)]
fn report_state_change(ctx: &SockOpsContext) {
    // SAFETY: the context is a valid bpf_sock_ops for the whole program run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(entry) = FLOWS.get_ptr_mut(cookie) else {
        return;
    };
    let (old_state, new_state) = (ctx.arg(0), ctx.arg(1));
    // SAFETY: `entry` is a live map value (see `add`).
    let redirected = unsafe { (*entry).bytes_redirected };
    output(&FlowEvent {
        cookie,
        bytes_redirected: redirected,
        kind: FlowEventKind::StateChange as u32,
        old_state,
        new_state,
        _pad: 0,
    });
    // SAFETY: as above.
    if !is_fin_arrival(old_state, new_state) || unsafe { (*entry).eof_target_plus_one } != 0 {
        return;
    }
    // The state changes inside tcp_fin(), before tcp_data_ready() hands the last
    // segment to the verdict, so the count is not final yet. bytes_received is:
    // it counts the sequence space received, the FIN's one included.
    // SAFETY: the context is a valid bpf_sock_ops of a full TCP socket here.
    let received = unsafe { (*ctx.ops).bytes_received };
    // SAFETY: see `add`.
    let consumed = unsafe { (*entry).consumed_by_user };
    let target = received.saturating_sub(1).saturating_sub(consumed);
    debug!(
        ctx,
        "socket {}: FIN after {} bytes, {} of them read by user space",
        cookie,
        received.saturating_sub(1),
        consumed
    );
    // SAFETY: see `add`; an atomic add to the still-zero field publishes the target
    // to a verdict running concurrently on another CPU (see report_if_drained).
    unsafe {
        add(&raw mut (*entry).eof_target_plus_one, target + 1);
        report_if_drained(entry, cookie);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
