//! Polls of foreign fds (eventfd, pipe) in the ring, and dropping rings with work in flight.

use peerpipe_uring::{AlignedBuf, Error, FileOptions, FileTarget, IoBuf, OpKind, Ring};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

fn eventfd() -> OwnedFd {
    // SAFETY: plain syscall; the returned fd is owned below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn signal(fd: &OwnedFd) {
    let v: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64.
    let r = unsafe { libc::write(fd.as_raw_fd(), (&v as *const u64).cast(), 8) };
    assert_eq!(r, 8);
}

fn drain_eventfd(fd: &OwnedFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a valid u64.
    unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

#[test]
fn oneshot_poll_fires_when_eventfd_is_signalled() {
    let efd = eventfd();
    let mut ring: Ring = Ring::new().unwrap();
    ring.poll_add(&efd, libc::POLLIN, false, 42).unwrap();
    let mut out = Vec::new();
    // Not ready yet: nothing within 100 ms.
    assert_eq!(
        ring.wait_timeout(1, Duration::from_millis(100), &mut out)
            .unwrap(),
        0
    );
    assert_eq!(ring.in_flight(), 1);
    signal(&efd);
    assert_eq!(
        ring.wait_timeout(1, Duration::from_secs(5), &mut out)
            .unwrap(),
        1
    );
    let c = out.pop().unwrap();
    assert_eq!((c.tag, c.kind, c.more), (42, OpKind::Poll, false));
    assert!(c.result.unwrap() & libc::POLLIN as usize != 0);
    assert_eq!(ring.in_flight(), 0);
}

#[test]
fn multishot_poll_fires_repeatedly_until_removed() {
    let efd = eventfd();
    let mut ring: Ring = Ring::new().unwrap();
    let id = ring.poll_add(&efd, libc::POLLIN, true, 7).unwrap();
    let mut out = Vec::new();
    for _ in 0..3 {
        signal(&efd);
        assert_eq!(
            ring.wait_timeout(1, Duration::from_secs(5), &mut out)
                .unwrap(),
            1
        );
        let c = out.pop().unwrap();
        assert_eq!(c.tag, 7);
        assert!(c.more, "multishot stays armed");
        drain_eventfd(&efd);
    }
    ring.poll_remove(id).unwrap();
    assert_eq!(
        ring.wait_timeout(1, Duration::from_secs(5), &mut out)
            .unwrap(),
        1
    );
    let c = out.pop().unwrap();
    assert!(!c.more);
    assert_eq!(c.result.unwrap_err().errno(), Some(libc::ECANCELED));
    assert_eq!(ring.in_flight(), 0);
    assert!(matches!(ring.poll_remove(id), Err(Error::Invalid { .. })));
}

#[test]
fn poll_and_file_io_share_the_ring() {
    let p = std::env::temp_dir().join(format!("peerpipe-uring-{}-mix", std::process::id()));
    std::fs::write(&p, vec![5u8; 4096]).unwrap();
    let f = FileTarget::open(&p, FileOptions::default()).unwrap();
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two fds into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fresh fds we own.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut ring: Ring = Ring::new().unwrap();
    let t = ring.add_file(&f).unwrap();
    ring.poll_add(&rd, libc::POLLIN, false, 1).unwrap();
    ring.read(t, 0, AlignedBuf::new(4096), 2).unwrap();
    let mut out = Vec::new();
    ring.wait_timeout(1, Duration::from_secs(5), &mut out)
        .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].tag, 2, "the read completes, the pipe is still empty");
    // SAFETY: writes one byte from a valid buffer.
    assert_eq!(
        unsafe { libc::write(wr.as_raw_fd(), b"x".as_ptr().cast(), 1) },
        1
    );
    ring.wait_timeout(2, Duration::from_secs(5), &mut out)
        .unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].tag, 1);
    let _ = std::fs::remove_file(&p);
}

#[test]
fn dropping_a_ring_with_an_armed_poll_returns() {
    let efd = eventfd();
    let mut ring: Ring = Ring::new().unwrap();
    ring.poll_add(&efd, libc::POLLIN, true, 1).unwrap();
    ring.poll_add(&efd, libc::POLLIN, false, 2).unwrap();
    ring.submit().unwrap();
    let start = Instant::now();
    drop(ring); // cancels the polls and waits for their final completions
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn dropping_a_ring_with_io_queued_and_in_flight_waits_for_it() {
    let p = std::env::temp_dir().join(format!("peerpipe-uring-{}-dropio", std::process::id()));
    std::fs::write(&p, vec![1u8; 1 << 20]).unwrap();
    let f = FileTarget::open(&p, FileOptions::default()).unwrap();
    for submit_first in [false, true] {
        let mut ring: Ring = Ring::builder().entries(64).build().unwrap();
        let t = ring.add_file(&f).unwrap();
        for i in 0..64u64 {
            ring.read(t, (i % 16) * 65536, AlignedBuf::new(65536), i)
                .unwrap();
        }
        if submit_first {
            ring.submit().unwrap();
        }
        assert_eq!(ring.in_flight(), 64);
        drop(ring); // must not free buffers the kernel is still writing
    }
    let _ = std::fs::remove_file(&p);
}

#[test]
fn iopoll_ring_refuses_polls_and_file_syncs_clearly() {
    let mut ring: Ring = Ring::builder().iopoll(true).build().unwrap();
    if ring.capabilities().iopoll != peerpipe_uring::Feature::On {
        panic!(
            "host kernel accepts IORING_SETUP_IOPOLL: {}",
            ring.capabilities()
        );
    }
    let efd = eventfd();
    let e = ring.poll_add(&efd, libc::POLLIN, false, 1).unwrap_err();
    assert!(
        matches!(e, Error::Unsupported { .. }) && e.to_string().contains("IOPOLL"),
        "{e}"
    );
}

#[test]
fn nonblocking_reap_finds_completions() {
    let p = std::env::temp_dir().join(format!("peerpipe-uring-{}-reap", std::process::id()));
    std::fs::write(&p, vec![3u8; 8192]).unwrap();
    let f = FileTarget::open(&p, FileOptions::default()).unwrap();
    let mut ring: Ring = Ring::new().unwrap();
    let t = ring.add_file(&f).unwrap();
    let mut out = Vec::new();
    assert_eq!(ring.reap(&mut out).unwrap(), 0, "nothing in flight");
    ring.read(t, 0, AlignedBuf::new(4096), 1).unwrap();
    ring.read(t, 4096, AlignedBuf::new(4096), 2).unwrap();
    let start = Instant::now();
    while out.len() < 2 {
        ring.reap(&mut out).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "reap never found the completions"
        );
    }
    assert!(out
        .iter()
        .all(|c| c.result.as_ref().is_ok_and(|&n| n == 4096)));
    let _ = std::fs::remove_file(&p);
}

/// A completion that arrives while the ring's thread is not in the kernel (here: an eventfd
/// signalled by another thread while the poll is armed) is deferred task work under
/// DEFER_TASKRUN; `reap`, which enters the kernel only when the ring is flagged
/// (TASKRUN_FLAG), must still find it.
#[test]
fn reap_finds_a_completion_deferred_while_the_thread_was_away() {
    let efd = eventfd();
    let mut ring: Ring = Ring::new().unwrap();
    ring.poll_add(&efd, libc::POLLIN, false, 7).unwrap();
    let mut out = Vec::new();
    assert_eq!(ring.reap(&mut out).unwrap(), 0, "not signalled yet");
    std::thread::scope(|s| {
        s.spawn(|| signal(&efd));
    });
    let start = Instant::now();
    while out.is_empty() {
        ring.reap(&mut out).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "reap never found the poll's completion ({})",
            ring.capabilities()
        );
    }
    assert_eq!(out[0].tag, 7);
    assert_eq!(ring.in_flight(), 0);
}

#[test]
fn register_buffers_stops_at_the_first_refusal_with_its_errno() {
    let mut ring: Ring = Ring::new().unwrap();
    let mut a = AlignedBuf::new(4096);
    let regions = [(a.as_mut_ptr(), 4096), (0x1000 as *mut u8, 4096)];
    // SAFETY: `a` outlives the ring's registration (unregistered below before it drops); the
    // second region is refused and never used.
    let e = unsafe { ring.register_buffers(&regions) }.unwrap_err();
    assert_eq!(e.errno(), Some(libc::EFAULT));
    assert_eq!(e.op(), "io_uring_register_buffers");
    assert_eq!(ring.capabilities().unregistered_buffers.len(), 1);
    ring.unregister_buffers().unwrap();
    drop(a);
}
