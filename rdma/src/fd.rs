//! File-descriptor helpers shared by the completion channel and the rdma_cm event channel:
//! making an fd non-blocking and waiting (with a timeout) for fds to become readable.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use crate::error::{last_errno, Errno, Error, Result};

/// Sets `O_NONBLOCK` on `fd`.
///
/// # Errors
/// `Verbs { op: "fcntl" }`.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a live fd (borrowed for the call).
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(Error::last_os("fcntl"));
    }
    Ok(())
}

/// Waits up to `timeout` for any of `fds` to become readable; says which are (all false on
/// timeout). `EINTR` restarts the wait.
///
/// # Errors
/// `Verbs { op: "poll" }`.
pub(crate) fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: valid pollfd array of p.len() entries; the fds are borrowed for the call.
        let rc = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let errno = last_errno();
            if errno == libc::EINTR {
                continue;
            }
            return Err(Error::Verbs {
                op: "poll",
                errno: Errno(errno),
            });
        }
        return Ok(p.iter().map(|x| x.revents != 0).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn readable_only_after_a_write_and_nonblocking_sticks() {
        let (mut a, b) = UnixStream::pair().unwrap();
        set_nonblocking(b.as_fd()).unwrap();
        // SAFETY: fcntl on a live fd.
        let fl = unsafe { libc::fcntl(b.as_raw_fd(), libc::F_GETFL) };
        assert!(fl & libc::O_NONBLOCK != 0);
        let ready = wait_readable(&[b.as_fd(), a.as_fd()], Duration::from_millis(10)).unwrap();
        assert_eq!(ready, [false, false], "nothing written yet");
        a.write_all(b"x").unwrap();
        let ready = wait_readable(&[a.as_fd(), b.as_fd()], Duration::from_secs(5)).unwrap();
        assert_eq!(ready, [false, true], "only the receiving end is readable");
    }
}
