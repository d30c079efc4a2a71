//! Running `vmm-client` on a pseudo-terminal, to drive it as a person would:
//! what it writes is collected as it arrives, keys are typed into it.
//!
//! Included with `#[path]` by the tests that need a terminal only, so that
//! the others do not compile (and warn about) what they never use.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::pty::{Winsize, openpty};
use vmm_tests::Deadline;

/// What a process wrote to its terminal, as it arrives.
#[derive(Clone, Default)]
pub struct Screen(Arc<Mutex<Vec<u8>>>);

impl Screen {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until `what` appears after byte `from`; returns where it ends.
    pub async fn wait_for(&self, what: &str, from: usize) -> usize {
        let deadline = Instant::now() + vmm_tests::PATIENCE;
        loop {
            let text = self.text();
            if let Some(at) = text.get(from..).and_then(|rest| rest.find(what)) {
                return from + at + what.len();
            }
            assert!(
                Instant::now() < deadline,
                "{what:?} never came after byte {from}; the screen:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// `vmm-client` running on a terminal of its own.
pub struct Terminal {
    pub child: Child,
    pub screen: Screen,
    keyboard: std::fs::File,
}

impl Terminal {
    /// Starts `command` on a new pseudo-terminal of `rows` lines, as its
    /// controlling terminal (a session of its own), so that what opens
    /// `/dev/tty` (the password prompt) gets this terminal too, never the
    /// one the tests run in.
    pub fn start(mut command: Command, rows: u16) -> Terminal {
        let size = Winsize {
            ws_row: rows,
            ws_col: 200,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(&size, None).expect("a pseudo-terminal");
        command
            .env("TERM", "xterm")
            .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
            .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
            .stderr(Stdio::from(pty.slave));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if nix::libc::setsid() == -1
                    || nix::libc::ioctl(0, nix::libc::TIOCSCTTY as _, 0) == -1
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start vmm-client");
        drop(command); // the child holds the only copies of the terminal's end

        let keyboard = std::fs::File::from(pty.master);
        let mut display = keyboard.try_clone().unwrap();
        let screen = Screen::default();
        let filled = screen.clone();
        // Blocking reads; they end when the child's end of the terminal closes.
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = display.read(&mut buf) {
                filled.0.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Terminal {
            child,
            screen,
            keyboard,
        }
    }

    pub fn typing(&mut self, text: &str) {
        self.keyboard.write_all(text.as_bytes()).unwrap();
        self.keyboard.flush().unwrap();
    }

    /// Changes the terminal's size, as a window being resized does: the
    /// process gets SIGWINCH.
    #[allow(dead_code)] // only tests/top.rs resizes
    pub fn resize(&self, rows: u16, cols: u16) {
        use std::os::fd::AsRawFd;
        let size = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer.
        let set =
            unsafe { nix::libc::ioctl(self.keyboard.as_raw_fd(), nix::libc::TIOCSWINSZ, &size) };
        assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
    }

    /// Waits (bounded) for the process to exit.
    pub async fn exited(&mut self) -> ExitStatus {
        let deadline = Deadline::new("vmm-client to exit");
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            deadline.tick().await;
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // A test that failed halfway leaves no shell behind.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
