//! One module per area of the mock.

mod binary;
mod delta;
mod file;
mod management;
mod reflection;
mod sotw;
