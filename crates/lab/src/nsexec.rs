//! Starting a command inside namespaces from a `pre_exec` hook, using only async-signal-safe calls.
//!
//! The sequence, in the child that `Command::spawn` forks:
//! 1. enter existing namespaces (`setns`), `unshare` new ones (a new PID namespace applies only to
//!    children), make `/` recursively private, set the hostname;
//! 2. `fork` again. The first child stays outside the PID namespace as a *supervisor*: it reports
//!    the second child's pid on a pipe, forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to it,
//!    closes every fd, waits for it and exits with its code (128+signal when it was killed).
//!    The second child is PID 1 of the new PID namespace (or a member of an entered one): it asks
//!    for SIGKILL when the supervisor dies, mounts a fresh `/proc`, and returns to `exec`.
//!
//! So the `Child` the caller holds is the supervisor: its exit status is the command's, killing it
//! kills the command (and with it the whole PID namespace, whose init the command is), and since it
//! is never reaped by anyone else its pid cannot be reused behind the caller's back.

use std::ffi::{CStr, CString, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;
use nix::libc;
use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::{ForkResult, Pid};

/// What the hook does between fork and exec.
#[derive(Debug)]
pub(crate) struct Plan {
    /// Namespaces to enter, in order (entering the mount namespace last keeps the others' paths).
    pub enter: Vec<(OwnedFd, CloneFlags)>,
    /// Namespaces to create.
    pub unshare: CloneFlags,
    /// Make every mount recursively private first, so nothing propagates to the host.
    pub private_root: bool,
    /// Hostname to set (needs a new UTS namespace).
    pub hostname: Option<OsString>,
    /// Mount a fresh procfs on /proc in the command's process (needs new mount + PID namespaces).
    pub mount_proc: bool,
    /// Kill the supervisor (and so the command) when the thread that spawned it exits.
    pub die_with_parent: bool,
    /// Directory to change to after entering a mount namespace (setns resets the cwd).
    pub cwd: Option<CString>,
    /// Write end of a pipe: the supervisor writes the command's pid (i32, native endian) on it.
    pub pid_report: Option<OwnedFd>,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            enter: Vec::new(),
            unshare: CloneFlags::empty(),
            private_root: false,
            hostname: None,
            mount_proc: false,
            die_with_parent: false,
            cwd: None,
            pid_report: None,
        }
    }
}

/// Installs `plan` as `cmd`'s pre-exec hook.
pub(crate) fn install(cmd: &mut Command, plan: Plan) {
    // SAFETY: the hook runs in the forked child before exec. It only reads data prepared before
    // the fork and makes system calls that are async-signal-safe (prctl, setns, unshare, mount,
    // sethostname, fork, sigaction, write, close_range/close, waitpid, kill, chdir, _exit); it does
    // not allocate and takes no locks (nix passes &CStr/&OsStr arguments straight through, and
    // io::Error::from(Errno) holds a raw OS error, no allocation).
    unsafe {
        cmd.pre_exec(move || plan.run().map_err(std::io::Error::from));
    }
}

static SUPERVISED: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = SUPERVISED.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; pid is our own child.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

impl Plan {
    fn run(&self) -> Result<(), Errno> {
        if self.die_with_parent {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
        }
        for (fd, kind) in &self.enter {
            nix::sched::setns(fd, *kind)?;
        }
        if !self.unshare.is_empty() {
            nix::sched::unshare(self.unshare)?;
        }
        if self.private_root {
            nix::mount::mount(
                None::<&CStr>,
                c"/",
                None::<&CStr>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&CStr>,
            )?;
        }
        if let Some(name) = &self.hostname {
            nix::unistd::sethostname(name)?;
        }
        // SAFETY: we are the single-threaded child of a fork; both sides below only make
        // async-signal-safe calls until exec or _exit.
        match unsafe { nix::unistd::fork() }? {
            ForkResult::Parent { child } => self.supervise(child),
            ForkResult::Child => {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                if self.mount_proc {
                    nix::mount::mount(
                        Some(c"proc"),
                        c"/proc",
                        Some(c"proc"),
                        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                        None::<&CStr>,
                    )?;
                }
                if let Some(dir) = &self.cwd {
                    nix::unistd::chdir(dir.as_c_str())?;
                }
                Ok(())
            }
        }
    }

    fn supervise(&self, child: Pid) -> ! {
        SUPERVISED.store(child.as_raw(), Ordering::Relaxed);
        let action = SigAction::new(
            SigHandler::Handler(forward),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for sig in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
            Signal::SIGQUIT,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
        ] {
            // SAFETY: `forward` only loads an atomic and calls kill(2).
            let _ = unsafe { nix::sys::signal::sigaction(sig, &action) };
        }
        if let Some(fd) = &self.pid_report {
            let _ = nix::unistd::write(fd, &child.as_raw().to_ne_bytes());
        }
        close_all_fds();
        loop {
            match nix::sys::wait::waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => exit(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => exit(128 + sig as i32),
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => exit(127),
            }
        }
    }
}

/// Closes every fd of the supervisor (it must not hold the caller's pipes open).
fn close_all_fds() {
    // SAFETY: close_range(2) only closes descriptors of this process; nothing uses them after.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) };
    if rc != 0 {
        for fd in 0..1024 {
            // SAFETY: as above, one descriptor at a time (kernels before 5.9).
            unsafe {
                libc::close(fd);
            }
        }
    }
}

fn exit(code: i32) -> ! {
    // SAFETY: _exit(2) is async-signal-safe and skips atexit handlers and destructors, which must
    // not run in a forked copy of the caller.
    unsafe { libc::_exit(code) }
}
