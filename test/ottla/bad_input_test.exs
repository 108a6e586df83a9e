defmodule Ottla.BadInputTest do
  # Not async: it runs many calls against the shared broker, in a VM of its own.
  use ExUnit.Case, async: false

  alias Ottla.BadInput

  @moduletag timeout: 900_000

  # Calls run concurrently in the peer: most fail validation at once, the others wait on a
  # broker (up to their short timeouts).
  @lanes 8

  describe "generated bad input" do
    @tag :fuzz
    test "every public function returns a documented value or raises ArgumentError" do
      seed = env_int("OTTLA_FUZZ_SEED") || :rand.uniform(1_000_000_000)
      count = env_int("OTTLA_FUZZ_CALLS") || 10_000

      indexes =
        case System.get_env("OTTLA_FUZZ_INDEX") do
          nil -> Enum.to_list(0..(count - 1))
          list -> list |> String.split(",", trim: true) |> Enum.map(&String.to_integer/1)
        end

      started = System.monotonic_time(:millisecond)
      {peer, ctx} = start_peer(seed)
      result = run_calls(peer, ctx, seed, indexes)
      stop_peer(peer)
      secs = (System.monotonic_time(:millisecond) - started) / 1000

      kinds =
        result.kinds
        |> Enum.sort_by(fn {_, n} -> -n end)
        |> Enum.map_join(", ", fn {kind, n} -> "#{inspect(kind)} #{n}" end)

      IO.puts(
        "\nbad input: #{result.done} calls in #{Float.round(secs, 1)} s, seed #{seed} " <>
          "(replay: OTTLA_FUZZ_SEED=#{seed}); outcomes: #{kinds}; defects: #{length(result.defects)}"
      )

      crash =
        case result.died do
          nil ->
            []

          in_flight ->
            culprit = isolate_crash(seed, in_flight)
            [{culprit, "the VM crashed (the peer died) while running this call", nil}]
        end

      defects = crash ++ Enum.sort_by(result.defects, fn {i, _, _} -> i || -1 end)

      if defects != [] do
        shown =
          defects
          |> Enum.take(25)
          |> Enum.map_join("\n", fn {index, why, code} ->
            code = code || render_index(seed, index, ctx)

            "  call #{inspect(index)}: #{why}\n    #{code}\n    replay: OTTLA_FUZZ_SEED=#{seed} " <>
              "OTTLA_FUZZ_INDEX=#{inspect(index)} mix test #{__ENV__.file}"
          end)

        flunk("#{length(defects)} call(s) did something undocumented (seed #{seed}):\n#{shown}")
      end
    end
  end

  defp env_int(name) do
    case System.get_env(name) do
      nil -> nil
      value -> String.to_integer(value)
    end
  end

  defp start_peer(seed) do
    paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])
    {:ok, peer, _node} = :peer.start_link(%{connection: :standard_io, args: paths})
    # The peer is linked; its death must be an outcome, not the end of the test process.
    Process.unlink(peer)

    ctx =
      :peer.call(
        peer,
        Ottla.BadInput.Runner,
        :setup,
        [Ottla.TestSupport.endpoints(), seed],
        60_000
      )

    {peer, ctx}
  end

  defp stop_peer(peer) do
    :peer.stop(peer)
  catch
    _, _ -> :ok
  end

  defp run_calls(peer, ctx, seed, indexes) do
    queue = :ets.new(:fuzz_queue, [:public])
    in_flight = :ets.new(:fuzz_in_flight, [:public])
    :ets.insert(queue, {:next, 0})
    todo = List.to_tuple(indexes)

    lanes =
      for lane <- 1..@lanes do
        Task.async(fn -> lane(lane, peer, ctx, seed, todo, queue, in_flight, []) end)
      end

    results = Task.await_many(lanes, :infinity)
    died? = Enum.any?(results, &match?({:peer_died, _}, &1))
    records = Enum.flat_map(results, fn {_, records} -> records end)

    kinds = Enum.frequencies_by(records, fn {_, kind, _} -> kind end)
    defects = for {index, _, {:defect, why, code}} <- records, do: {index, why, code}

    died =
      if died?,
        do: in_flight |> :ets.tab2list() |> Enum.map(&elem(&1, 1)) |> Enum.sort()

    %{done: length(records), kinds: kinds, defects: defects, died: died}
  end

  defp lane(lane, peer, ctx, seed, todo, queue, in_flight, acc) do
    at = :ets.update_counter(queue, :next, 1) - 1

    if at >= tuple_size(todo) do
      {:ok, acc}
    else
      index = elem(todo, at)
      call = BadInput.call(seed, index, ctx)
      :ets.insert(in_flight, {lane, index})

      if System.get_env("OTTLA_FUZZ_VERBOSE"),
        do: IO.puts(:stderr, "call #{index}: #{BadInput.render(call)}")

      try do
        :peer.call(
          peer,
          Ottla.BadInput.Runner,
          :run,
          [call.mfa, call.budget],
          call.budget + 30_000
        )
      catch
        :exit, _ -> {:peer_died, acc}
      else
        {outcome, _ms} ->
          :ets.delete(in_flight, lane)

          verdict =
            case BadInput.classify(call.expect, outcome) do
              :ok -> :ok
              {:defect, why} -> {:defect, why, BadInput.render(call)}
            end

          lane(lane, peer, ctx, seed, todo, queue, in_flight, [
            {index, BadInput.kind(outcome), verdict} | acc
          ])
      end
    end
  end

  # The peer died with several calls in flight: run each alone in a new peer; the first one
  # that kills it is the reproducer.
  defp isolate_crash(seed, candidates) do
    Enum.find(candidates, List.first(candidates), fn index ->
      {peer, ctx} = start_peer(seed)
      call = BadInput.call(seed, index, ctx)

      try do
        :peer.call(
          peer,
          Ottla.BadInput.Runner,
          :run,
          [call.mfa, call.budget],
          call.budget + 30_000
        )

        stop_peer(peer)
        false
      catch
        :exit, _ -> true
      end
    end)
  end

  defp render_index(_seed, nil, _ctx), do: "(unknown call)"
  defp render_index(seed, index, ctx), do: BadInput.render(BadInput.call(seed, index, ctx))
end
