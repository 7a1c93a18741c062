//! For the client's own tests: an in-process chunk server over a memory
//! store on a free loopback port, stopped when dropped.

/// A running in-process server.
pub(crate) struct TestServer {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestServer {
    pub(crate) async fn start() -> TestServer {
        TestServer::start_with(thaw_server::ServerConfig::default()).await
    }

    pub(crate) async fn start_with(config: thaw_server::ServerConfig) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(thaw_server::run(listener, config, async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            stop: Some(stop),
        }
    }

    /// A reference to `name_tag` on this server, and a client for it.
    pub(crate) fn image(&self, name_tag: &str) -> (crate::ImageRef, crate::Remote) {
        let r = crate::ImageRef::parse(&format!("{}/{name_tag}", self.addr)).unwrap();
        let remote = crate::Remote::for_ref(&r, None).unwrap();
        (r, remote)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
