#!/bin/sh
#VMWRAP --image=tiny
echo tiny $(id -u) $(pwd); ls /
