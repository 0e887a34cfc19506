//! `twinmqd`: the broker daemon (see `twinmq_broker::daemon`).

fn main() {
    std::process::exit(twinmq_broker::daemon::main_with_args(std::env::args_os()));
}
