"""What SecAgg+ needs on both sides of the wire: CSPRNG masks installed into Flower's
SecAgg+ (and checked to be the generator Flower actually calls), and the uint32 wire
encoding of masked vectors."""
