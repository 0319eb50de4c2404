//! The local terminal for `ember sandbox exec -it`: raw mode (keys go to
//! the sandbox's terminal unprocessed; Ctrl-C is a byte, not a signal here),
//! restored when the guard drops — on a normal exit, an error, a signal
//! Ember handles, and a panic's unwinding — and the window size to give the
//! sandbox's PTY.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use nix::sys::termios::{self, SetArg, Termios};

/// Raw mode on stdin until dropped.
#[derive(Debug)]
pub struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    /// Switch stdin to raw mode; `None` when stdin is not a terminal.
    pub fn enable() -> nix::Result<Option<RawTerminal>> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(Some(RawTerminal { saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        if let Err(e) = termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &self.saved) {
            eprintln!("ember: could not restore the terminal ({e}); run `reset`");
        }
    }
}

/// Rows and columns of the terminal on stdout (else stdin), if any.
pub fn window_size() -> Option<(u32, u32)> {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize into the struct we own; a
        // descriptor that is not a terminal makes it fail with ENOTTY.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if rc == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return Some((u32::from(ws.ws_row), u32::from(ws.ws_col)));
        }
    }
    None
}
