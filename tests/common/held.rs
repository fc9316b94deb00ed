//! Raw HTTP/1.1 clients for tests about what a connection does at the socket level:
//! a response held unread (a stalled reader), requests written by hand.

/// A GET whose response is held: headers read, body left unread. The receive buffer is
/// pinned small before connecting, which turns off the kernel's receive autotuning; with
/// it on, loopback buffers grow to `tcp_rmem`'s maximum (32 MiB on some machines) and
/// the server could finish sending a "held" blob and release it.
pub struct HeldResponse {
    pub stream: tokio::net::TcpStream,
    /// What was read past the headers.
    pub body_start: Vec<u8>,
    pub status: u16,
    pub content_length: usize,
}

impl HeldResponse {
    pub async fn get(base: &str, path: &str) -> HeldResponse {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr: std::net::SocketAddr = base
            .trim_start_matches("http://")
            .parse()
            .expect("regcache address");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(64 << 10).expect("SO_RCVBUF");
        let mut stream = socket.connect(addr).await.expect("connect to regcache");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send request");
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("read headers");
            assert!(n > 0, "connection closed before the headers ended");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let content_length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("content-length header");
        HeldResponse {
            stream,
            body_start: buf[end..].to_vec(),
            status,
            content_length,
        }
    }

    pub async fn body(mut self) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut body = self.body_start;
        self.stream
            .read_to_end(&mut body)
            .await
            .expect("held stream completes");
        assert_eq!(body.len(), self.content_length, "the whole body arrived");
        body
    }
}

impl HeldResponse {
    /// Reads what is left until the server closes the connection (end of stream or a
    /// reset) and returns the body bytes that arrived.
    pub async fn rest_until_closed(mut self) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut body = self.body_start;
        let mut chunk = vec![0u8; 256 << 10];
        loop {
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return body,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Connects to `base` (`http://host:port`).
pub async fn connect(base: &str) -> tokio::net::TcpStream {
    let addr = base.trim_start_matches("http://");
    tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to regcache")
}

/// Reads from `stream` until the peer closes it (end of stream or a reset); returns what
/// arrived.
pub async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends `GET path` on a keep-alive connection and reads one whole response (which must
/// carry a `content-length`); returns its status line and body.
pub async fn keep_alive_get(stream: &mut tokio::net::TcpStream, path: &str) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: regcache\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send request");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length header");
            if buf.len() >= end + length {
                let status = head.lines().next().unwrap_or_default().to_owned();
                return (status, buf[end..end + length].to_vec());
            }
        }
        let n = stream.read(&mut chunk).await.expect("read response");
        assert!(n > 0, "connection closed before the response ended");
        buf.extend_from_slice(&chunk[..n]);
    }
}
