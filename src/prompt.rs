//! Reading a password for `gateway passwd`: on a terminal, a prompt on stderr and input
//! without echo, asked twice (as `mosquitto_passwd` does); from a pipe, the first line of
//! stdin with no prompt, so scripts keep working.
//!
//! Echo is turned off with termios directly (libc is already a dependency): the terminal
//! settings are restored by a guard even when reading fails.

use std::io::{self, BufRead, IsTerminal, Write};
use std::os::fd::{AsRawFd, RawFd};

/// Why no password was read.
#[derive(Debug)]
pub enum PromptError {
    Io(io::Error),
    /// The two entries on the terminal differ.
    Mismatch,
}

impl std::fmt::Display for PromptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PromptError::Io(e) => write!(f, "cannot read the password: {e}"),
            PromptError::Mismatch => write!(f, "the passwords do not match"),
        }
    }
}

impl From<io::Error> for PromptError {
    fn from(e: io::Error) -> Self {
        PromptError::Io(e)
    }
}

/// Restores the terminal's settings when dropped.
struct EchoOff {
    fd: RawFd,
    saved: libc::termios,
}

impl EchoOff {
    fn new(fd: RawFd) -> io::Result<EchoOff> {
        // SAFETY: tcgetattr only writes the termios we pass, which lives on our stack;
        // an all-zero termios is a valid value for it to overwrite.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        // SAFETY: tcsetattr reads the termios we pass for the duration of the call.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(EchoOff { fd, saved })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: as in `new`; restores the settings read there.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
    }
}

/// One line of stdin without its line ending.
fn read_line() -> io::Result<String> {
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Prints `prompt` on stderr and reads one line from the terminal on stdin without echo.
/// Echo goes off before the prompt shows: whatever is typed (or pasted) as soon as the
/// prompt appears must not be echoed.
fn hidden(prompt: &str) -> io::Result<String> {
    let _echo_off = EchoOff::new(io::stdin().as_raw_fd())?;
    eprint!("{prompt}");
    io::stderr().flush()?;
    read_line()
}

/// The new password: asked twice without echo when stdin is a terminal, else the first
/// line of stdin.
pub fn new_password() -> Result<String, PromptError> {
    if !io::stdin().is_terminal() {
        return Ok(read_line()?);
    }
    let first = hidden("Password: ")?;
    let second = hidden("Reenter password: ")?;
    if first != second {
        return Err(PromptError::Mismatch);
    }
    Ok(first)
}
