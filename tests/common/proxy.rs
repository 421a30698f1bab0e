//! A TCP proxy in front of PostgreSQL that a test can cut and restore: from the daemon's side
//! this is exactly a database that went down (connections reset, new ones refused) and came back,
//! without stopping the Postgres server other tests share.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::Mutex,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    state: Arc<Mutex<Option<Running>>>,
}

struct Running {
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Proxy {
            addr,
            upstream,
            state: Arc::new(Mutex::new(None)),
        };
        proxy.serve(listener).await;
        proxy
    }

    async fn serve(&self, listener: TcpListener) {
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let (upstream, token) = (self.upstream, stop.clone());
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    accepted = listener.accept() => {
                        let Ok((mut client, _)) = accepted else { continue };
                        conns.spawn(async move {
                            if let Ok(mut server) = TcpStream::connect(upstream).await {
                                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            }
                        });
                    }
                }
            }
            conns.abort_all(); // resets every open connection
        });
        *self.state.lock().await = Some(Running { stop, tasks });
    }

    /// The database "goes down": open connections are reset, new ones refused.
    pub async fn cut(&self) {
        if let Some(mut running) = self.state.lock().await.take() {
            running.stop.cancel();
            while running.tasks.join_next().await.is_some() {}
        }
    }

    /// The database "comes back" on the same address.
    pub async fn restore(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener).await;
    }
}
