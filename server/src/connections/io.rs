//! A connection's socket, watched: bytes read move the connection out of
//! waiting (so the header timeout starts), a read that finds nothing more
//! makes a new connection one that may be evicted, and a write that makes
//! no progress for the write timeout fails, which closes a connection whose
//! client has stopped reading its response and frees what the response held.
//! How long a write has been blocked is also what picks the connection to
//! close when the response memory runs short (`crate::responses`).

use super::tracker::Conn;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

pub(crate) struct WatchedIo {
    tcp: TcpStream,
    conn: Arc<Conn>,
    write_timeout: Duration,
    /// Running while a write is blocked.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl WatchedIo {
    pub(crate) fn new(tcp: TcpStream, conn: Arc<Conn>, write_timeout: Duration) -> WatchedIo {
        WatchedIo {
            tcp,
            conn,
            write_timeout,
            stalled: None,
        }
    }

    /// Passes on a write's result, or fails a write blocked for too long.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            if self.stalled.take().is_some() {
                self.conn.write_unblocked();
            }
            return polled;
        }
        if self.stalled.is_none() {
            self.conn.write_blocked();
        }
        let limit = self.write_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.tcp).poll_read(cx, buf);
        match polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => self.conn.bytes_arrived(),
            Poll::Pending => self.conn.read_dry(),
            _ => {}
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
