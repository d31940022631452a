// Package durability tests what a power cut does to committed layers, the
// way filesystem developers do: shut the filesystem down without flushing
// (XFS_IOC_GOINGDOWN), mount it again, look.
package durability
