//! A guest's serial console: read into lines on a thread, written to by tests.
//!
//! The reader keeps every line (a test's guest prints little), so a failure
//! can show what the guest said, and waits hand over lines in order: each
//! [`Console::wait_line`] looks at the lines after the one the previous wait
//! returned.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The console of one QEMU process.
#[derive(Debug)]
pub struct Console {
    shared: Arc<Shared>,
    writer: UnixStream,
    /// Index of the first line the next wait looks at.
    cursor: usize,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    lines: Vec<String>,
    partial: Vec<u8>,
    /// QEMU closed the connection (it exited).
    closed: bool,
}

/// How a wait for a line ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited {
    /// The index of the line and the line.
    Line(usize, String),
    /// The console closed first: QEMU is gone.
    Closed,
    TimedOut,
}

impl Console {
    /// Starts reading `stream` (QEMU's end of the serial port) on a thread.
    pub fn start(stream: UnixStream) -> std::io::Result<Console> {
        let shared = Arc::new(Shared::default());
        let mut reader = stream.try_clone()?;
        let echo = std::env::var_os("THAW_GUEST_LOG").is_some_and(|v| v != "0");
        let s = shared.clone();
        std::thread::Builder::new()
            .name("guest-console".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    let n = reader.read(&mut buf).unwrap_or(0);
                    let mut state = s.state.lock().expect("console lock");
                    if n == 0 {
                        state.closed = true;
                        s.changed.notify_all();
                        return;
                    }
                    state.push(&buf[..n], echo);
                    s.changed.notify_all();
                }
            })?;
        Ok(Console {
            shared,
            writer: stream,
            cursor: 0,
        })
    }

    /// Types `line` and Enter on the guest's console.
    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        self.writer.write_all(format!("{line}\n").as_bytes())
    }

    /// The next line (after the last one a wait returned) for which `wanted`
    /// is true.
    pub fn wait_line(&mut self, timeout: Duration, wanted: impl Fn(&str) -> bool) -> Waited {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state.lock().expect("console lock");
        loop {
            if let Some(i) = (self.cursor..state.lines.len()).find(|&i| wanted(&state.lines[i])) {
                self.cursor = i + 1;
                return Waited::Line(i, state.lines[i].clone());
            }
            if state.closed {
                return Waited::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Waited::TimedOut;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .expect("console lock")
                .0;
        }
    }

    /// Every complete line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lock().lines.clone()
    }

    /// The last `n` lines and any unfinished one, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let state = self.lock();
        let start = state.lines.len().saturating_sub(n);
        let mut text = state.lines[start..].join("\n");
        if !state.partial.is_empty() {
            text.push('\n');
            text.push_str(&String::from_utf8_lossy(&state.partial));
        }
        text
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().expect("console lock")
    }
}

impl State {
    /// Splits what arrived into lines (the serial port sends `\r\n`).
    fn push(&mut self, bytes: &[u8], echo: bool) {
        for &b in bytes {
            match b {
                b'\n' => {
                    let line = String::from_utf8_lossy(&self.partial).into_owned();
                    self.partial.clear();
                    if echo {
                        eprintln!("guest| {line}");
                    }
                    self.lines.push(line);
                }
                b'\r' => {}
                _ => self.partial.push(b),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_over_lines_in_order_and_sees_the_end() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut console = Console::start(ours).unwrap();
        let mut qemu = theirs;
        qemu.write_all(b"boot\r\nready\r\nrea").unwrap();
        let t = Duration::from_secs(5);
        assert_eq!(
            console.wait_line(t, |l| l.starts_with("rea")),
            Waited::Line(1, "ready".into())
        );
        // "ready" was handed over; the unfinished "rea" is not a line yet.
        let short = Duration::from_millis(50);
        assert_eq!(
            console.wait_line(short, |l| l.starts_with("rea")),
            Waited::TimedOut
        );
        qemu.write_all(b"dy again\n").unwrap();
        assert_eq!(
            console.wait_line(t, |l| l.starts_with("rea")),
            Waited::Line(2, "ready again".into())
        );

        console.write_line("go").unwrap();
        let mut typed = [0u8; 3];
        qemu.read_exact(&mut typed).unwrap();
        assert_eq!(&typed, b"go\n");

        drop(qemu);
        assert_eq!(console.wait_line(t, |_| true), Waited::Closed);
        assert_eq!(console.lines(), ["boot", "ready", "ready again"]);
    }
}
