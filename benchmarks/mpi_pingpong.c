/* MPI ping-pong between ranks 0 and 1 (benchmarks/multinode.py --mpi): latency = half a 1-byte round
 * trip, bandwidth = 1 MiB messages sent back and forth; rank 0 prints one line. Also a check that MPI
 * works across the job's VMs: each rank says where it runs.
 * usage: mpirun -np 2 mpi_pingpong ROUNDS MIB */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

static char buf[1 << 20];

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size, len;
    char host[MPI_MAX_PROCESSOR_NAME];
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Get_processor_name(host, &len);
    printf("rank %d of %d on %s\n", rank, size, host);
    fflush(stdout);
    int rounds = argc > 1 ? atoi(argv[1]) : 1000, mib = argc > 2 ? atoi(argv[2]) : 16;
    int peer = 1 - rank;
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    for (int i = 0; i < rounds && rank < 2; i++) {
        if (rank == 0) { MPI_Send(buf, 1, MPI_CHAR, peer, 0, MPI_COMM_WORLD); MPI_Recv(buf, 1, MPI_CHAR, peer, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE); }
        else { MPI_Recv(buf, 1, MPI_CHAR, peer, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE); MPI_Send(buf, 1, MPI_CHAR, peer, 0, MPI_COMM_WORLD); }
    }
    double lat = (MPI_Wtime() - t0) / rounds / 2;
    t0 = MPI_Wtime();
    for (int i = 0; i < mib && rank < 2; i++) {
        if (rank == 0) { MPI_Send(buf, sizeof buf, MPI_CHAR, peer, 1, MPI_COMM_WORLD); MPI_Recv(buf, sizeof buf, MPI_CHAR, peer, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE); }
        else { MPI_Recv(buf, sizeof buf, MPI_CHAR, peer, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE); MPI_Send(buf, sizeof buf, MPI_CHAR, peer, 1, MPI_COMM_WORLD); }
    }
    double bw = 2.0 * mib / (MPI_Wtime() - t0);
    if (rank == 0) printf("mpi latency_us %.1f bandwidth_mib_s %.1f\n", lat * 1e6, bw);
    MPI_Finalize();
    return 0;
}
