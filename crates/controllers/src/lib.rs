//! skiff-controllers: one module per controller, each a client of the API through `kube`,
//! sharing one reflector per resource type, run by the controller manager inside `skiff server`.
