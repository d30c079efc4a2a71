//! The migrations are embedded at compile time by `refinery::embed_migrations!`,
//! which cargo cannot see through: tell it that a new or changed migration file
//! means a rebuild.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
