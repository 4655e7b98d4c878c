//! The socket under an SMTP session, with the time limit of the stage in progress.
//!
//! RFC 5321 §4.5.3.2 gives each stage of a transaction its own limit (5 minutes for the
//! greeting and each command, 2 for DATA's 354, 3 for each block of the body, 10 for the
//! reply after the final dot), and Postfix's `smtp_*_timeout` follow it. One timeout over
//! the whole transaction cannot: a limit short enough for a dead server's greeting gives up
//! on a receiver still scanning a message it has, and the retry sends it twice. lettre's
//! session reads and writes through this stream, so the session code sets the stage's
//! limits before each step and any read or write that waits longer than that without
//! progress fails with `TimedOut`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use lettre::transport::smtp::client::AsyncTokioStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// The limits of the stage in progress, shared by the session code and its stream.
#[derive(Debug, Default)]
pub struct Limits {
    /// Bumped by every [`Limits::set`]: a new stage, whose reply gets a fresh deadline.
    stage: AtomicU64,
    read_ms: AtomicU64,
    write_ms: AtomicU64,
    /// A write failed or timed out: the peer cannot have had all of what was written.
    write_failed: AtomicBool,
    /// A read timed out (as opposed to the connection closing or failing).
    read_timed_out: AtomicBool,
}

impl Limits {
    pub fn new(both: Duration) -> Arc<Self> {
        let l = Arc::new(Limits::default());
        l.set(both, both);
        l
    }

    /// Starts a stage: its reply must come within `read` (however it trickles in), and
    /// each write may wait at most `write` for progress.
    pub fn set(&self, read: Duration, write: Duration) {
        self.read_ms.store(millis(read), Ordering::Relaxed);
        self.write_ms.store(millis(write), Ordering::Relaxed);
        self.stage.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets the failures seen so far (before a new step is judged by them).
    pub fn clear_failures(&self) {
        self.write_failed.store(false, Ordering::Relaxed);
        self.read_timed_out.store(false, Ordering::Relaxed);
    }

    pub fn write_failed(&self) -> bool {
        self.write_failed.load(Ordering::Relaxed)
    }

    pub fn read_timed_out(&self) -> bool {
        self.read_timed_out.load(Ordering::Relaxed)
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().clamp(1, u64::MAX as u128) as u64
}

/// A TCP stream whose reads fail with `TimedOut` once the current stage's reply is overdue,
/// and whose writes fail so when one waits too long for progress.
pub struct Deadlined {
    inner: TcpStream,
    limits: Arc<Limits>,
    /// The deadline of the stage `read_stage`, from its first wait for a reply.
    read_timer: Timer,
    read_stage: u64,
    write_timer: Timer,
}

/// One timer, allocated once per session and re-armed for each wait (a wait per reply is a
/// wait per message: no allocation there).
struct Timer {
    sleep: Pin<Box<Sleep>>,
    armed: bool,
}

impl Timer {
    fn new() -> Self {
        Timer {
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: false,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }

    /// Arms the timer for `limit_ms` if it is not armed, then polls it: true once it fired
    /// (and it is disarmed again).
    fn expired(&mut self, limit_ms: u64, cx: &mut Context<'_>) -> bool {
        if !self.armed {
            let at = Instant::now() + Duration::from_millis(limit_ms);
            self.sleep.as_mut().reset(at);
            self.armed = true;
        }
        let fired = self.sleep.as_mut().poll(cx).is_ready();
        if fired {
            self.armed = false;
        }
        fired
    }
}

impl Deadlined {
    pub fn new(inner: TcpStream, limits: Arc<Limits>) -> Self {
        Deadlined {
            inner,
            limits,
            read_timer: Timer::new(),
            read_stage: 0,
            write_timer: Timer::new(),
        }
    }
}

impl std::fmt::Debug for Deadlined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deadlined")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

fn timed_out(what: &str, ms: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what} timed out after {:?}", Duration::from_millis(ms)),
    )
}

impl AsyncRead for Deadlined {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let stage = this.limits.stage.load(Ordering::Relaxed);
        if stage != this.read_stage {
            this.read_stage = stage;
            this.read_timer.disarm();
        }
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => {
                let ms = this.limits.read_ms.load(Ordering::Relaxed);
                if this.read_timer.expired(ms, cx) {
                    this.limits.read_timed_out.store(true, Ordering::Relaxed);
                    return Poll::Ready(Err(timed_out("waiting for the reply", ms)));
                }
                Poll::Pending
            }
        }
    }
}

impl Deadlined {
    /// One write-side poll under the write limit; a failure is remembered.
    fn poll_write_side<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let r = match op(Pin::new(&mut self.inner), cx) {
            Poll::Ready(r) => r,
            Poll::Pending => {
                let ms = self.limits.write_ms.load(Ordering::Relaxed);
                if !self.write_timer.expired(ms, cx) {
                    return Poll::Pending;
                }
                Err(timed_out("sending", ms))
            }
        };
        self.write_timer.disarm();
        if r.is_err() {
            self.limits.write_failed.store(true, Ordering::Relaxed);
        }
        Poll::Ready(r)
    }
}

impl AsyncWrite for Deadlined {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_side(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_write_side(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}

impl AsyncTokioStream for Deadlined {
    fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.inner.peer_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_fails_after_the_stage_limit_and_not_before() {
        let (c, mut s) = pair().await;
        let limits = Limits::new(Duration::from_secs(600));
        let mut d = Deadlined::new(c, limits.clone());
        let mut buf = [0u8; 8];
        // A reply after 9 minutes of a 10-minute limit arrives.
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(540)).await;
            s.write_all(b"250 ok\r\n").await.unwrap();
            s
        });
        let n = d.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"250 ok\r\n");
        let mut s = late.await.unwrap();
        // Within one stage the deadline holds however the reply trickles in.
        limits.set(Duration::from_secs(60), Duration::from_secs(60));
        let trickle = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(25)).await;
                s.write_all(b"2").await.unwrap();
            }
            s
        });
        let t0 = Instant::now();
        let mut got = 0;
        let e = loop {
            match d.read(&mut buf).await {
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert_eq!((got, t0.elapsed()), (2, Duration::from_secs(60)));
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let _s = trickle.await.unwrap();
        // The next stage allows 2 minutes: the byte already there is read at once, then the
        // read gives up at the deadline, and says so.
        limits.set(Duration::from_secs(120), Duration::from_secs(120));
        assert_eq!(d.read(&mut buf).await.unwrap(), 1);
        let t0 = Instant::now();
        let e = d.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t0.elapsed(), Duration::from_secs(120));
        assert!(limits.read_timed_out() && !limits.write_failed());
    }
}
