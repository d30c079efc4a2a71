//! Background tasks tied to the server that started them.

use tokio::task::JoinHandle;

/// A task that is aborted when this handle is dropped, so that it cannot
/// outlive the server that started it (not even an aborted one).
#[derive(Debug)]
pub(crate) struct AbortOnDrop(JoinHandle<()>);

impl AbortOnDrop {
    pub(crate) fn spawn(
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> AbortOnDrop {
        AbortOnDrop(tokio::spawn(task))
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
