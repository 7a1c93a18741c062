//! A small QMP client: QEMU's JSON monitor protocol over a unix socket.
//!
//! One JSON object per line. QEMU greets with `{"QMP": ...}`; the client
//! answers `qmp_capabilities` before anything else. A command gets either
//! `{"return": ...}` or `{"error": {"class", "desc"}}`; events
//! (`{"event": ...}`) may arrive at any time and are kept until asked for.

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// How long a command may take to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What can go wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP: cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP: {0}")]
    Protocol(String),
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> QmpError + '_ {
    move |source| QmpError::Io {
        what: what.to_string(),
        source,
    }
}

/// A QMP connection, past the capabilities negotiation.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// What was read of a line a timeout interrupted.
    partial: String,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Reads the greeting and negotiates capabilities.
    pub fn handshake(stream: UnixStream) -> Result<Qmp, QmpError> {
        let writer = stream.try_clone().map_err(io("clone the socket"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            partial: String::new(),
            events: VecDeque::new(),
        };
        let greeting = qmp
            .read_message(Instant::now() + REPLY_TIMEOUT)?
            .ok_or_else(|| QmpError::Protocol("no greeting".into()))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` (an object) and returns its `return`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            request["arguments"] = arguments;
        }
        let line = format!("{request}\n");
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Io {
                what: format!("send {command}"),
                source,
            })?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let Some(mut message) = self.read_message(deadline)? else {
                return Err(QmpError::Protocol(format!(
                    "no reply to {command} in {REPLY_TIMEOUT:?}"
                )));
            };
            if message.get("event").is_some() {
                self.events.push_back(message);
            } else if let Some(error) = message.get("error") {
                return Err(QmpError::Protocol(format!("{command}: {error}")));
            } else if let Some(value) = message.get_mut("return") {
                return Ok(value.take());
            } else {
                return Err(QmpError::Protocol(format!(
                    "unexpected reply to {command}: {message}"
                )));
            }
        }
    }

    /// The next event named `name` (earlier events of other names are
    /// dropped), or `None` if none came within `timeout`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Option<Value>, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(event) = self.events.pop_front() {
                if event["event"] == name {
                    return Ok(Some(event));
                }
            }
            match self.read_message(deadline)? {
                Some(message) if message.get("event").is_some() => self.events.push_back(message),
                Some(message) => {
                    return Err(QmpError::Protocol(format!("unexpected message {message}")));
                }
                None => return Ok(None),
            }
        }
    }

    /// The next message, or `None` at the deadline.
    fn read_message(&mut self, deadline: Instant) -> Result<Option<Value>, QmpError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(io("set a read timeout"))?;
            match self.reader.read_line(&mut self.partial) {
                Ok(0) => return Err(QmpError::Protocol("QEMU closed the connection".into())),
                Ok(_) if self.partial.ends_with('\n') => {
                    let line = std::mem::take(&mut self.partial);
                    return serde_json::from_str(&line)
                        .map(Some)
                        .map_err(|e| QmpError::Protocol(format!("bad JSON {line:?}: {e}")));
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io("read from QEMU")(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted QEMU end: answers each request with the next reply, then
    /// hands back the requests and its end of the socket (still open).
    type Qemu = std::thread::JoinHandle<(Vec<Value>, UnixStream)>;

    fn fake_qemu(replies: Vec<&'static str>) -> (UnixStream, Qemu) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let qemu = std::thread::spawn(move || {
            let mut writer = theirs.try_clone().unwrap();
            writer
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut requests = Vec::new();
            let mut lines = BufReader::new(theirs).lines();
            for reply in replies {
                let line = lines.next().unwrap().unwrap();
                requests.push(serde_json::from_str(&line).unwrap());
                writer.write_all(reply.as_bytes()).unwrap();
            }
            (requests, writer)
        });
        (ours, qemu)
    }

    #[test]
    fn negotiates_runs_commands_and_keeps_events() {
        let (stream, qemu) = fake_qemu(vec![
            "{\"return\": {}}\r\n",
            "{\"event\": \"STOP\", \"data\": {}}\r\n{\"return\": {}}\r\n",
            "{\"return\": {\"status\": \"paused\", \"running\": false}}\r\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\r\n",
        ]);
        let mut qmp = Qmp::handshake(stream).unwrap();
        qmp.execute("stop", json!({})).unwrap();
        let status = qmp.execute("query-status", json!({})).unwrap();
        assert_eq!(status["status"], "paused");
        let err = qmp
            .execute("migrate", json!({ "uri": "file:/x" }))
            .unwrap_err();
        assert!(err.to_string().contains("GenericError"), "{err}");
        let stop = qmp.wait_event("STOP", Duration::from_secs(1)).unwrap();
        assert!(stop.is_some());
        assert!(qmp
            .wait_event("RESUME", Duration::from_millis(50))
            .unwrap()
            .is_none());

        let (requests, _open) = qemu.join().unwrap();
        assert_eq!(requests[0], json!({ "execute": "qmp_capabilities" }));
        assert_eq!(
            requests[3],
            json!({ "execute": "migrate", "arguments": { "uri": "file:/x" } })
        );
    }
}
