defmodule Ottla.Partitioner do
  @moduledoc """
  Chooses a partition for a message key, as Elsa's `Elsa.Partitioner` did. Pass a module
  implementing it as `Ottla.produce/4`'s `:partitioner`.

  Ottla ships three:

    * `Ottla.Partitioner.Default` - the Java client's partitioner: murmur2 of the key, so
      Java and Elixir producers put a key on the same partition; keyless messages are spread
      at random. (Elsa's `Elsa.Partitioner.Default` put every message on partition 0; for that,
      pass `partition: 0`.)
    * `Ottla.Partitioner.Md5` - Elsa's md5 partitioner, so keys keep the partitions they had
      under Elsa.
    * `Ottla.Partitioner.Random` - a random partition.

  ## Example

      defmodule MyApp.ByTenant do
        @behaviour Ottla.Partitioner
        def partition(count, "tenant-" <> id), do: rem(String.to_integer(id), count)
      end

      :ok = Ottla.produce(:conn, "events", {"tenant-7", "x"}, partitioner: MyApp.ByTenant)
  """

  @doc "The partition (from 0 to `partition_count - 1`) for `key`."
  @callback partition(partition_count :: pos_integer, key :: binary | nil) :: non_neg_integer
end

defmodule Ottla.Partitioner.Default do
  @moduledoc """
  The Java client's default partitioner: `toPositive(murmur2(key)) % partition_count`;
  a `nil` key goes to a random partition. `Ottla.produce/4` leaves this to librdkafka
  (`partitioner=murmur2_random`), which places keys exactly the same way.
  """
  @behaviour Ottla.Partitioner
  import Bitwise

  @impl true
  def partition(count, nil), do: :rand.uniform(count) - 1
  def partition(count, key) when is_binary(key), do: rem(band(murmur2(key), 0x7FFFFFFF), count)

  @m 0x5BD1E995
  defp mul(a, b), do: band(a * b, 0xFFFFFFFF)

  # Kafka's murmur2 (seed 0x9747b28c), on 32-bit words read little-endian.
  defp murmur2(data) do
    {h, rest} = blocks(data, bxor(0x9747B28C, byte_size(data)))

    h =
      case rest do
        <<a, b, c>> -> mul(bxor(h, a ||| b <<< 8 ||| c <<< 16), @m)
        <<a, b>> -> mul(bxor(h, a ||| b <<< 8), @m)
        <<a>> -> mul(bxor(h, a), @m)
        <<>> -> h
      end

    h = mul(bxor(h, h >>> 13), @m)
    bxor(h, h >>> 15)
  end

  defp blocks(<<k::little-32, rest::binary>>, h) do
    k = mul(k, @m)
    k = mul(bxor(k, k >>> 24), @m)
    blocks(rest, bxor(mul(h, @m), k))
  end

  defp blocks(rest, h), do: {h, rest}
end

defmodule Ottla.Partitioner.Md5 do
  @moduledoc "Elsa's md5 partitioner: the sum of the md5 digest's bytes, modulo the count."
  @behaviour Ottla.Partitioner

  @impl true
  def partition(count, key),
    do: :crypto.hash(:md5, key || "") |> :binary.bin_to_list() |> Enum.sum() |> rem(count)
end

defmodule Ottla.Partitioner.Random do
  @moduledoc "A random partition for every message."
  @behaviour Ottla.Partitioner

  @impl true
  def partition(count, _key), do: :rand.uniform(count) - 1
end
