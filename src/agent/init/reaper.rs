//! Child reaping. As PID 1 the agent inherits every orphan of the VM and must reap them
//! all, while the exit status of a child it started has to reach the session waiting
//! for it. One thread owns `waitpid(-1)`; sessions register the pids they fork in a
//! pid → sender map.
//!
//! The race "the child exits before it is registered" is closed by forking *inside*
//! [`Reaper::spawn`], under the map's lock: the reaper thread can collect the status
//! right after the fork, but cannot look the pid up before the registration is in.
//!
//! Outside PID 1 (unit tests on the host) a process-wide `waitpid(-1)` would steal the
//! children of unrelated code, so [`ReapMode::Registered`] waits for each registered
//! pid on its own thread instead.

use std::collections::HashMap;
use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::sys;

/// How children are collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapMode {
    /// Reap every child of the process (PID 1).
    All,
    /// Reap only registered children (tests, or any non-init process).
    Registered,
}

#[derive(Default)]
struct State {
    waiters: HashMap<i32, Sender<i32>>,
    registrations: u64,
}

/// The shared reaper; see the module documentation.
pub struct Reaper {
    mode: ReapMode,
    state: Mutex<State>,
    wakeup: Condvar,
}

impl Reaper {
    /// Creates the reaper and, in [`ReapMode::All`], starts its thread.
    pub fn start(mode: ReapMode) -> io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper {
            mode,
            state: Mutex::new(State::default()),
            wakeup: Condvar::new(),
        });
        if mode == ReapMode::All {
            let r = reaper.clone();
            std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || r.reap_all())?;
        }
        Ok(reaper)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `fork` (which must fork and return the child's pid) with the registration
    /// lock held, and returns the pid and a receiver for its raw wait status.
    pub fn spawn<F>(&self, fork: F) -> io::Result<(i32, Receiver<i32>)>
    where
        F: FnOnce() -> io::Result<i32>,
    {
        let (tx, rx) = mpsc::channel();
        let mut state = self.lock();
        let pid = fork()?;
        match self.mode {
            ReapMode::All => {
                state.waiters.insert(pid, tx);
                state.registrations += 1;
                self.wakeup.notify_all();
            }
            ReapMode::Registered => {
                drop(state);
                std::thread::Builder::new()
                    .name(format!("wait-{pid}"))
                    .spawn(move || {
                        if let Ok(status) = sys::waitpid(pid) {
                            let _ = tx.send(status);
                        }
                    })?;
            }
        }
        Ok((pid, rx))
    }

    fn reap_all(&self) {
        loop {
            let mut status = 0;
            let seen = self.lock().registrations;
            // SAFETY: `status` is a valid place for the kernel to store the status.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid > 0 {
                let waiter = self.lock().waiters.remove(&pid);
                if let Some(tx) = waiter {
                    let _ = tx.send(status);
                }
                continue;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ECHILD) {
                // No children at all: sleep until something is forked.
                let state = self.lock();
                if state.registrations == seen {
                    let _ = self.wakeup.wait_timeout(state, Duration::from_millis(500));
                }
            } else if err.kind() != io::ErrorKind::Interrupted {
                log::error!("waitpid: {err}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn spawn_sh(reaper: &Reaper, script: &str) -> (i32, Receiver<i32>) {
        let argv: Vec<CString> = ["/bin/sh", "-c", script]
            .iter()
            .map(|s| CString::new(*s).unwrap())
            .collect();
        let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        reaper
            .spawn(|| {
                // SAFETY: the child only calls execv and _exit, both async-signal-safe.
                let pid = unsafe { sys::fork() }?;
                if pid == 0 {
                    // SAFETY: argv pointers stay valid in the child's copy of memory.
                    unsafe {
                        libc::execv(ptrs[0], ptrs.as_ptr());
                        libc::_exit(127);
                    }
                }
                Ok(pid)
            })
            .unwrap()
    }

    #[test]
    fn registered_children_report_status() {
        let reaper = Reaper::start(ReapMode::Registered).unwrap();
        let (_, rx) = spawn_sh(&reaper, "exit 3");
        assert_eq!(sys::status_code(rx.recv().unwrap()), 3);
        // Exits immediately: no lost status.
        let (pid, rx) = spawn_sh(&reaper, "kill -9 $$");
        assert!(pid > 0);
        assert_eq!(sys::status_code(rx.recv().unwrap()), 137);
    }
}
