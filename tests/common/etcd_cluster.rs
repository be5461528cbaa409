//! A real etcd cluster of one or more members (Debian's `etcd-server`), on free loopback ports,
//! in a temporary data dir, for the tests (`tests/integration/etcd.rs`, `tests/chaos/`) and the
//! failover and soak benchmarks (`bench/failover.rs`, `bench/soak.rs`). Members can be killed and restarted with their data,
//! or paused (SIGSTOP: a frozen VM, or a member cut off without its connections being closed);
//! every member is killed when the cluster is dropped.
//!
//! Elections are fast (heartbeat 50 ms, election timeout 500 ms), so a lost leader is replaced
//! within about a second. Leadership is read from each member's status through etcd's JSON
//! gateway (`POST /v3/maintenance/status`), so this file needs no etcd client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One member: how to start it, and its process while it runs.
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    data: PathBuf,
    child: Option<Child>,
    paused: bool,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    _dir: tempfile::TempDir,
}

/// Loopback ports that are free now (bound together, so none is handed out twice).
pub fn free_ports(n: usize) -> Vec<SocketAddr> {
    let sockets: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    sockets
        .iter()
        .map(|s| s.local_addr().expect("bound socket has an address"))
        .collect()
}

impl EtcdCluster {
    /// Start `n` members and wait until they have elected a leader.
    pub async fn start(n: usize) -> Self {
        let dir = tempfile::tempdir().expect("temporary dir");
        let ports = free_ports(2 * n);
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: ports[2 * i],
                peer: ports[2 * i + 1],
                data: dir.path().join(format!("m{i}")),
                child: None,
                paused: false,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members,
            initial_cluster,
            _dir: dir,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.until_leader(Duration::from_secs(20)).await;
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let client = format!("http://{}", m.client);
        let peer = format!("http://{}", m.peer);
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .args(["--data-dir", m.data.to_str().expect("utf-8 temp path")])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd must be installed (Debian: apt-get install etcd-server)");
        self.members[i].child = Some(child);
    }

    /// Every member's client URL, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect()
    }

    /// Kill member `i` outright (SIGKILL, which ends a stopped process too); its data stays
    /// for [`EtcdCluster::restart`].
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.members[i].paused = false;
    }

    /// Start a killed member again, with its data.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
    }

    /// Pause (`true`, SIGSTOP) or resume (`false`, SIGCONT) member `i`.
    pub fn pause(&mut self, i: usize, paused: bool) {
        use nix::sys::signal::{kill, Signal};
        let child = self.members[i].child.as_ref().expect("member is running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        let signal = if paused {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        kill(pid, signal).expect("signal etcd");
        self.members[i].paused = paused;
    }

    /// The members that run and are not paused.
    fn answering(&self) -> impl Iterator<Item = (usize, &Member)> {
        self.members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.child.is_some() && !m.paused)
    }

    /// Wait (up to `limit`) until a running member leads and every running member agrees;
    /// returns it.
    pub async fn until_leader(&self, limit: Duration) -> usize {
        let start = Instant::now();
        loop {
            if let Some(i) = self.agreed_leader().await {
                return i;
            }
            assert!(
                start.elapsed() < limit,
                "etcd elected no leader in {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The member that leads, if it and every other answering member say so.
    pub async fn agreed_leader(&self) -> Option<usize> {
        let mut seen = Vec::new();
        for (i, m) in self.answering() {
            let (me, leader) = status(m.client).await?;
            seen.push((i, me, leader));
        }
        let (_, _, first) = seen.first()?.clone();
        if first == "0" || seen.iter().any(|(_, _, l)| *l != first) {
            return None;
        }
        seen.iter()
            .find(|(_, me, _)| *me == first)
            .map(|(i, _, _)| *i)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // No signal that could panic here: a panic while a failed test unwinds would abort
        // before the other members are killed.
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A member's own ID and the leader it knows ("0" for none), or `None` if it did not answer
/// within 200 ms.
async fn status(client: SocketAddr) -> Option<(String, String)> {
    let ask = async {
        let mut stream = TcpStream::connect(client).await.ok()?;
        let request = format!(
            "POST /v3/maintenance/status HTTP/1.1\r\nHost: {client}\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response);
        let body = text.split_once("\r\n\r\n")?.1;
        let json: serde_json::Value = serde_json::from_str(body).ok()?;
        let me = json["header"]["member_id"].as_str()?.to_owned();
        let leader = json["leader"].as_str().unwrap_or("0").to_owned();
        Some((me, leader))
    };
    tokio::time::timeout(Duration::from_millis(200), ask)
        .await
        .ok()
        .flatten()
}
