//! Counters, and their rendering as Prometheus text at `GET /metrics`.
//!
//! Every metric name the server exports is defined here and nowhere else.
//! Counters are plain atomics; requests are counted per (route template,
//! status) in a small mutex-protected map (the number of routes is fixed).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub(crate) const HTTP_REQUESTS_TOTAL: &str = "thaw_http_requests_total";
pub(crate) const HTTP_BYTES_IN_TOTAL: &str = "thaw_http_bytes_in_total";
pub(crate) const HTTP_BYTES_OUT_TOTAL: &str = "thaw_http_bytes_out_total";
pub(crate) const HOT_CACHE_HITS_TOTAL: &str = "thaw_hot_cache_hits_total";
pub(crate) const HOT_CACHE_MISSES_TOTAL: &str = "thaw_hot_cache_misses_total";
pub(crate) const HOT_CACHE_BYTES: &str = "thaw_hot_cache_bytes";
pub(crate) const REQUEST_BODY_BYTES: &str = "thaw_request_body_bytes";
pub(crate) const RESPONSE_BYTES: &str = "thaw_response_bytes";
pub(crate) const STALLED_RESPONSES_CLOSED_TOTAL: &str = "thaw_stalled_responses_closed_total";
pub(crate) const CHUNKS_SERVED_TOTAL: &str = "thaw_chunks_served_total";
pub(crate) const QUARANTINED_TOTAL: &str = "thaw_quarantined_total";
pub(crate) const CONNECTIONS_OPEN: &str = "thaw_connections_open";
pub(crate) const CONNECTIONS_TIMED_OUT_TOTAL: &str = "thaw_connections_timed_out_total";
pub(crate) const CONNECTIONS_EVICTED_TOTAL: &str = "thaw_connections_evicted_total";

/// The route label of requests that matched no route.
pub(crate) const UNMATCHED_ROUTE: &str = "unmatched";

#[derive(Default)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    chunks_served: AtomicU64,
    quarantined: AtomicU64,
    connections_open: AtomicU64,
    connections_timed_out: AtomicU64,
    connections_evicted: AtomicU64,
    stalled_responses_closed: AtomicU64,
}

impl Metrics {
    pub(crate) fn request(&self, route: &str, status: u16) {
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *requests.entry((route.to_owned(), status)).or_default() += 1;
    }

    pub(crate) fn bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn cache_hit(&self) {
        self.cache_hits.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn cache_miss(&self) {
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn chunk_served(&self) {
        self.chunks_served.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn quarantined(&self) {
        self.quarantined.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_timed_out(&self) {
        self.connections_timed_out.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_evicted(&self) {
        self.connections_evicted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stalled_response_closed(&self) {
        self.stalled_responses_closed
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric, with the bytes held
    /// now by the hot cache, request bodies and responses.
    pub(crate) fn render(
        &self,
        hot_cache_bytes: u64,
        body_bytes: u64,
        response_bytes: u64,
    ) -> String {
        let mut out = String::new();
        header(
            &mut out,
            HTTP_REQUESTS_TOTAL,
            "counter",
            "HTTP requests by route template and status.",
        );
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for ((route, status), n) in requests {
            let route = escape_label(&route);
            let _ = writeln!(
                out,
                "{HTTP_REQUESTS_TOTAL}{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let scalars = [
            (
                HTTP_BYTES_IN_TOTAL,
                "counter",
                "Request body bytes read.",
                load(&self.bytes_in),
            ),
            (
                HTTP_BYTES_OUT_TOTAL,
                "counter",
                "Response body bytes sent.",
                load(&self.bytes_out),
            ),
            (
                HOT_CACHE_HITS_TOTAL,
                "counter",
                "Chunk reads served from the hot cache.",
                load(&self.cache_hits),
            ),
            (
                HOT_CACHE_MISSES_TOTAL,
                "counter",
                "Chunk reads that went to the object store.",
                load(&self.cache_misses),
            ),
            (
                HOT_CACHE_BYTES,
                "gauge",
                "Bytes of chunk frames held in the hot cache.",
                hot_cache_bytes,
            ),
            (
                REQUEST_BODY_BYTES,
                "gauge",
                "Bytes of room held for request bodies being received or handled.",
                body_bytes,
            ),
            (
                RESPONSE_BYTES,
                "gauge",
                "Bytes of room held for frames, manifests and profiles being sent.",
                response_bytes,
            ),
            (
                CHUNKS_SERVED_TOTAL,
                "counter",
                "Chunk frames sent, by GET and batch reads.",
                load(&self.chunks_served),
            ),
            (
                QUARANTINED_TOTAL,
                "counter",
                "Stored objects that failed verification and were moved to quarantine.",
                load(&self.quarantined),
            ),
            (
                CONNECTIONS_OPEN,
                "gauge",
                "Client connections open.",
                load(&self.connections_open),
            ),
            (
                CONNECTIONS_TIMED_OUT_TOTAL,
                "counter",
                "Connections closed for a header, idle or write timeout.",
                load(&self.connections_timed_out),
            ),
            (
                CONNECTIONS_EVICTED_TOTAL,
                "counter",
                "Connections closed to make room at the connection cap.",
                load(&self.connections_evicted),
            ),
            (
                STALLED_RESPONSES_CLOSED_TOTAL,
                "counter",
                "Connections closed because their client stopped reading while others waited for response memory.",
                load(&self.stalled_responses_closed),
            ),
        ];
        for (name, kind, help, value) in scalars {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.request("/v1/chunks/{id}", 200);
        m.request("/v1/chunks/{id}", 200);
        m.request("a\"b", 404);
        m.chunk_served();
        let text = m.render(7, 0, 0);
        assert!(
            text.contains("thaw_http_requests_total{route=\"/v1/chunks/{id}\",status=\"200\"} 2\n")
        );
        assert!(text.contains("thaw_http_requests_total{route=\"a\\\"b\",status=\"404\"} 1\n"));
        assert!(text.contains("# TYPE thaw_hot_cache_bytes gauge\nthaw_hot_cache_bytes 7\n"));
        assert!(text.contains("\nthaw_chunks_served_total 1\n"));
    }
}
